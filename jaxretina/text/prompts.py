"""Text prompts of FLAIR/KeepFIT: pretraining captions, expert-knowledge augmentation, zero-shot prompts.

Ports ``flair/pretraining/data/transforms.py: ProduceDescription, AugmentDescription``, the banned-category
filter of ``flair/pretraining/data/dataloader.py: get_loader`` (KeepFIT: exact match) and the description
lists built by ``FLAIRModel.compute_text_embeddings`` (docs/systems.md#flair).

Randomness comes from an explicit ``numpy.random.Generator`` instead of Python's global ``random``: the
distribution is the same (one uniform draw among the candidates), the exact draws are not.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from jaxretina.text import dictionary

FLAIR_TEMPLATE = "A [ATR] fundus photograph of [CLS]"
ZERO_SHOT_TEMPLATE = "A fundus photograph of [CLS]"

# Datasets whose labels upstream never swaps for expert descriptions (their category names are already the
# text FLAIR wanted, or their labels are too coarse for the dictionary).
NO_AUGMENT_DATASETS = ("06_EYENET", "11_STARE", "08_ODIR-5K", "31_JICHI")

# FLAIR's list for the out-of-distribution (incremental category) experiments.
BANNED_CATEGORIES = ("myopia", "cataract", "macular hole", "retinitis pigmentosa", "myopic", "myope", "myop",
                     "retinitis")

# FLAIR leaves the class name out of the prototype descriptions of these classes: the MMAC grade names
# ("myopic maculopathy grade two") carry no visual meaning.
_UNINFORMATIVE_CLASS_MARKER = "myopic maculopathy"


def _uniform_choice(options: Sequence[str], rng: np.random.Generator) -> str:
  return options[int(rng.integers(len(options)))]


def _check_rng(rng, where: str) -> None:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f"{where}: rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                    f"got {type(rng).__name__}")


def fill_template(template: str, category: str, attribute: str = "") -> str:
  """``template`` with ``[ATR]``/``[CLS]`` substituted, double spaces collapsed once, as upstream.

  Upstream runs ``str.replace("  ", " ")`` a single time, so an empty attribute leaves one space where
  ``"[ATR] "`` was. The result is also stripped: BERT tokenisation ignores surrounding whitespace, so
  this changes no token, only the string.
  """
  return template.replace("[ATR]", attribute).replace("[CLS]", category).replace("  ", " ").strip()


def produce_description(categories: Sequence[str], atributes: Sequence[str], rng: np.random.Generator,
                        template: str = FLAIR_TEMPLATE) -> tuple[str, str]:
  """FLAIR's ``ProduceDescription``: one caption from one random attribute and one random category.

  Args:
    categories: the sample's category names (may be empty: the caption then ends with "of").
    atributes: the sample's attributes, e.g. ``['clean']``; usually empty (spelled as upstream's column).
    rng: source of the two uniform draws.
    template: caption with ``[ATR]`` and ``[CLS]`` slots.

  Returns:
    ``(report, sel_category)``: the caption and the drawn category ("" when there is none), which
    defines the soft CLIP targets.
  """
  _check_rng(rng, "produce_description")
  attribute = _uniform_choice(list(atributes), rng) if len(atributes) > 0 else ""
  category = _uniform_choice(list(categories), rng) if len(categories) > 0 else ""
  return fill_template(template, category, attribute), category


def dataset_key_of(image_name: str) -> str:
  """The dataset key of an assembly image path: its first component (``01_EYEPACS/x.png`` → ``01_EYEPACS``)."""
  return image_name.split("/")[0]


def augment_description(report: str, sel_category: str, rng: np.random.Generator, dataset_key: str,
                        definitions: Mapping[str, Sequence[str]] | None = None,
                        no_augment_keys: Sequence[str] = NO_AUGMENT_DATASETS) -> str:
  """FLAIR's ``AugmentDescription``: swap the category in the caption for an expert description.

  Unless ``dataset_key`` is in ``no_augment_keys`` or ``sel_category`` has no dictionary entry, one
  uniform draw among ``[sel_category] + definitions[sel_category]`` replaces every occurrence of
  ``sel_category`` in ``report`` (upstream's ``str.replace``; the category only ever fills the ``[CLS]``
  slot of FLAIR's templates).

  Args:
    report: caption from ``produce_description``.
    sel_category: the category it was built from.
    rng: source of the draw (not consumed when nothing is augmented).
    dataset_key: first path component of the image, e.g. ``"01_EYEPACS"`` (see ``dataset_key_of``).
    definitions: the expert dictionary; default FLAIR's.
    no_augment_keys: datasets never augmented.

  Returns:
    The (possibly) augmented caption.
  """
  _check_rng(rng, "augment_description")
  if dataset_key in no_augment_keys:
    return report
  if definitions is None:
    definitions = dictionary.definitions("flair")
  if sel_category not in definitions:
    return report
  candidates = [sel_category] + list(definitions[sel_category])
  return report.replace(sel_category, _uniform_choice(candidates, rng))


def is_banned(categories: Sequence[str], mode: str = "substring",
              banned: Sequence[str] = BANNED_CATEGORIES) -> bool:
  """Whether a sample is dropped by the OOD filter.

  Args:
    categories: the sample's category names.
    mode: ``"substring"`` (FLAIR: any banned string inside any category, so "myop" bans
      "pathologic myopia") or ``"exact"`` (KeepFIT: a category equal to a banned string).
    banned: the banned strings.
  """
  if mode == "substring":
    return any(word in category for category in categories for word in banned)
  if mode == "exact":
    return any(category in banned for category in categories)
  raise ValueError(f"is_banned: mode must be 'substring' (FLAIR) or 'exact' (KeepFIT), got {mode!r}")


def class_descriptions(class_name: str, domain_knowledge: bool = True, variant: str = "flair",
                       definitions: Mapping[str, Sequence[str]] | None = None) -> list[str]:
  """The texts ``compute_text_embeddings`` averages into one zero-shot class prototype.

  With domain knowledge and a dictionary entry: the expert descriptions, plus the class name appended when
  absent — except for "myopic maculopathy …" classes (uninformative names). Otherwise ``[class_name]``.

  Args:
    class_name: the class as named in the experiment's target list.
    domain_knowledge: use the expert dictionary (``--domain_knowledge True`` in the published commands).
    variant: which upstream dictionary (``"flair"``/``"keepfit"``); ignored when ``definitions`` is given.
    definitions: an explicit dictionary instead of the shipped one.
  """
  if definitions is None:
    definitions = dictionary.definitions(variant)
  if not (domain_knowledge and class_name in definitions):
    return [class_name]
  descriptions = list(definitions[class_name])
  if class_name not in descriptions and _UNINFORMATIVE_CLASS_MARKER not in class_name:
    descriptions.append(class_name)
  return descriptions


def class_prompts(class_name: str, template: str = ZERO_SHOT_TEMPLATE, domain_knowledge: bool = True,
                  variant: str = "flair", definitions: Mapping[str, Sequence[str]] | None = None) -> list[str]:
  """``class_descriptions`` wrapped in the zero-shot template (``caption.replace("[CLS]", d)``).

  All prompts of one class must be tokenised together (shared padding) to match upstream, whose text
  embedding averages over padding positions too.
  """
  if "[CLS]" not in template:
    raise ValueError(f"class_prompts: template must contain the [CLS] slot, got {template!r}")
  return [template.replace("[CLS]", description)
          for description in class_descriptions(class_name, domain_knowledge, variant, definitions)]
