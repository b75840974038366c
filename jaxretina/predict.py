r"""Inference on a folder of images: ``python -m jaxretina.predict``.

  python -m jaxretina.predict --checkpoint /runs/keepfit --images photos/ --out preds/ \
      [--classes "normal,glaucoma,cataract"]
  python -m jaxretina.predict --checkpoint /runs/bira --images eyepacs/test/ --out preds/
  python -m jaxretina.predict --checkpoint /runs/crdnet --images fundus/ --images2 oct/ --out preds/
  python -m jaxretina.predict --checkpoint flair_resnet.pth --text_dir /weights/Bio_ClinicalBERT \
      --images photos/ --out preds/ --classes "no diabetic retinopathy,mild diabetic retinopathy"

``--checkpoint`` is either a jaxretina workdir (its ``config.json`` says what it is) or an upstream
FLAIR/KeepFIT PyTorch checkpoint (``.pth``/``.pt``/``.bin``/``.safetensors``/``.npz``; ResNet-50 +
the BERT of ``--text_dir``, as FLAIR builds them; KeepFIT's are recognised by their knowledge
attention weights).

* Two-tower (contrastive) models classify zero-shot: each class name becomes FLAIR's prompt(s)
  (domain-knowledge descriptions in the run's template), probabilities are
  ``softmax(e^s · image · prototypesᵀ)``. Classes: ``--classes``, else the run's ``zero_shot``
  evaluator's classes.
* Classifiers (``task='classification'``) give their evaluation logits' softmax over
  ``config.data.class_names``; models with attention maps (DualAttendMed/CAL, BiRA-Net, FCN-CLIP)
  also give ``heatmaps/<name>.png``: the input image at its resolution (at least 320 and at most
  1024 px on its longer side) beside the attention over it, with a colour bar. CRD-Net takes two modalities: ``--images`` for the
  first field of ``config.data.fields``, ``--images2`` for the second, paired by file stem (when the
  stems of the two sets coincide) else by sorted order (equal counts).

Preprocessing is the training one at the run's image size: two-tower models get FLAIR's canvas
(longer side resized with antialiasing, zero-padded right/bottom; the dataset builders store
images so); classifiers get the same square canvas by zero padding, then PIL's bilinear resize to
``image_size`` as the data pipeline does (then the centre ``config.data.crop_size``² when the run
crops), then ``config.data.normalize``. ``--fov_crop`` first
crops fundus photographs to their field of view (FLAIR's ``crop_foreground``; first field only).

Images are files or folders (searched recursively) of .png/.jpg/.jpeg/.tif/.tiff/.bmp (any case).
A file that cannot be read becomes a row with its reason in ``status``, never an abort; other files
found in the folders are listed as skipped. Writes ``OUT/predictions.csv`` (file, predicted class,
one probability column per class, status) and prints a short table. ``--checkpoint`` and ``--out``
may be ``gs://`` URLs (``jaxretina.fileio``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
from typing import Callable, Sequence

from jaxretina import host_memory

if __name__ == "__main__":
  host_memory.restart()  # before the imports below: it may start the process over

import numpy as np  # noqa: E402

from jaxretina import fileio, inference  # noqa: E402
from jaxretina.data import imaging  # noqa: E402
from jaxretina.data.augment import center_crop  # noqa: E402
from jaxretina.data.imaging import canvas_resize, crop_fov, flair_preprocess  # noqa: E402
from jaxretina.evaluators import plots  # noqa: E402
from jaxretina.evaluators.zero_shot import class_prototypes  # noqa: E402
from jaxretina.models import flair  # noqa: E402
from jaxretina.train import classification  # noqa: E402
from jaxretina.train.checkpoint import IncompatibleCheckpointError  # noqa: E402

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OK = "ok"


# ---------------------------------------------------------------------------------------------- files


@dataclasses.dataclass
class Entry:
  """One input: its image file(s) (one per model field) or, for a skipped file, the reason."""

  paths: tuple[str, ...]
  status: str = OK


def collect_images(specs: Sequence[str], flag: str = "--images") -> tuple[list[str], list[Entry]]:
  """Image files named by ``specs`` (files, or folders searched recursively, sorted).

  Returns ``(images, skipped)``: the image files, and the other (non-hidden) files found in the
  folders as skipped entries with their reason. A file named explicitly is always attempted.
  """
  images, skipped = [], []
  for spec in specs:
    if os.path.isfile(spec):
      images.append(spec)
      continue
    if not os.path.isdir(spec):
      raise FileNotFoundError(f"{flag} {spec}: no such file or directory")
    for root, dirs, files in os.walk(spec):
      dirs[:] = sorted(d for d in dirs if not d.startswith("."))
      for name in sorted(files):
        if name.startswith("."):
          continue
        path = os.path.join(root, name)
        ext = os.path.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
          images.append(path)
        else:
          skipped.append(Entry((path,), f"skipped: not an image file (extension {ext or 'none'!r}; expected one "
                                        f"of {', '.join(IMAGE_EXTENSIONS)})"))
  if not images:
    raise ValueError(f"{flag} {' '.join(specs)}: no image files found (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                     "recursively in folders)")
  return images, skipped


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def pair_images(first: list[str], second: list[str], fields: Sequence[str]) -> list[tuple[str, str]]:
  """Pairs two modalities' files: by identical file stems when both sets have the same unique stems,
  else by sorted order when the counts agree; otherwise a ValueError naming the mismatch."""
  stems1, stems2 = [_stem(p) for p in first], [_stem(p) for p in second]
  unique = len(set(stems1)) == len(stems1) and len(set(stems2)) == len(stems2)
  if unique and set(stems1) == set(stems2):
    by_stem = dict(zip(stems2, second))
    return [(p, by_stem[s]) for p, s in zip(first, stems1)]
  if len(first) == len(second):
    return list(zip(sorted(first), sorted(second)))
  only1 = sorted(set(stems1) - set(stems2))[:5]
  only2 = sorted(set(stems2) - set(stems1))[:5]
  raise ValueError(f"cannot pair the {fields[0]!r} images (--images, {len(first)} files) with the {fields[1]!r} "
                   f"images (--images2, {len(second)} files): the file stems differ (only in --images: {only1}; "
                   f"only in --images2: {only2}) and the counts differ, so sorted order cannot pair them either")


def read_image(path: str, channels: int) -> np.ndarray:
  """uint8 (H, W, channels) of an image file; 16-bit/float images are scaled by their maximum."""
  return imaging.read_file(path, channels)


# ---------------------------------------------------------------------------------------------- predictors


@dataclasses.dataclass
class Predictor:
  """A loaded model behind one interface.

  ``fields``: input names in model order, with ``channels``; ``preprocess(uint8 HWC, field) ->
  model image (S, S, C) float32 in [0, 1]``; ``predict(batch) -> (probabilities (B, K), attention
  (B, h, w) or None)`` for ``batch`` = {field: (B, S, S, C)}; ``input_box((H, W)) -> (top, left,
  height, width)``: the region of an H×W image that the model's S×S input shows (where the
  attention map lies on it; default: the square the image is zero-padded to).
  """

  description: str
  class_names: list[str]
  fields: dict[str, int]
  image_size: int
  preprocess: Callable[[np.ndarray, str], np.ndarray]
  predict: Callable[[dict], tuple[np.ndarray, np.ndarray | None]]
  input_box: Callable[[tuple[int, int]], tuple[float, float, float, float]] | None = None


def padded_square_box(image_size: int, crop_size: int | None = None):
  """``Predictor.input_box`` of the square-canvas preprocessing: the image zero-padded right/bottom to
  a square, resized to image_size², then (``crop_size``) centre-cropped."""

  def box(shape: tuple[int, int]) -> tuple[float, float, float, float]:
    side = float(max(shape[0], shape[1]))
    seen = crop_size / image_size if crop_size else 1.0
    offset = side * (1.0 - seen) / 2.0
    return offset, offset, side * seen, side * seen

  return box


def _canvas_preprocess(image_size: int):
  def preprocess(image: np.ndarray, field: str):
    del field
    canvas = canvas_resize(image, image_size)  # uint8 in, uint8 out: as the dataset builders store images
    return canvas.astype(np.float32) / 255.0

  return preprocess


def _flair_preprocess(image_size: int):
  def preprocess(image: np.ndarray, field: str):
    del field
    return flair_preprocess(image, image_size)

  return preprocess


def _pad_resize_preprocess(image_size: int, crop_size: int | None = None):
  """Zero-pad to a square (right/bottom, as the builders' canvas) then PIL bilinear to image_size,
  then the centre ``crop_size``² when given (a run trained with ``config.data.crop_size``)."""
  def preprocess(image: np.ndarray, field: str):
    del field
    resized = imaging.letterbox(image, image_size)
    if crop_size:
      resized = np.ascontiguousarray(center_crop(resized[None], (crop_size, crop_size))[0])
    return resized.astype(np.float32) / 255.0

  return preprocess


def _zero_shot_predict(model, variables, prototypes):
  import jax
  import jax.numpy as jnp

  variables = jax.device_put(variables)
  scale = jnp.exp(flair.clamp_logit_scale(jnp.asarray(variables["params"]["logit_scale"])))

  @jax.jit
  def probabilities(v, images):
    emb = model.apply(v, images, train=False, method=type(model).encode_image)
    return jax.nn.softmax(scale * emb @ prototypes.T, axis=-1)

  def predict(batch):
    (images,) = batch.values()
    return np.asarray(probabilities(variables, jnp.asarray(images))), None

  return predict


def _prototypes(model, variables, tokenizer, classes, settings, max_length):
  return class_prototypes(model, variables, tokenizer, classes, max_length=max_length, **settings)


def load_workdir_predictor(workdir: str, *, step: int | None = None, classes: list[str] | None = None,
                           template: str | None = None, image_size: int | None = None,
                           best: bool = False) -> Predictor:
  """A predictor for a jaxretina workdir (contrastive → zero-shot; classification → its logits)."""
  import jax
  import jax.numpy as jnp

  if inference.load_config(workdir).task == "contrastive":
    if best:
      raise ValueError(f"--best: {workdir} is a contrastive run; only classifier runs keep a best checkpoint")
    return _two_tower_predictor(inference.load_two_tower(workdir, step=step), classes, template, image_size,
                                _canvas_preprocess)

  config, _, model, variables = inference.load_run(workdir, step, best=best)
  size = int(image_size or config.data.image_size)
  crop = classification.input_crop_size(config.data)  # evaluation centre crop of a cropping run
  if crop and crop > size:
    raise ValueError(f"--image_size {size} is smaller than the run's crop config.data.crop_size={crop}")
  fields = classification.parse_fields(config.data.fields)
  num_classes = int(config.data.num_classes)
  names = list(config.data.class_names or [str(k) for k in range(num_classes)])
  if classes:
    if len(classes) != num_classes:
      raise ValueError(f"--classes names {len(classes)} classes; the classifier of {workdir} has {num_classes} "
                       f"({names})")
    names = list(classes)
  mode = config.data.normalize
  classification.normalize(jnp.zeros((1, 1, 1, 3)), mode)  # a bad mode fails here, not mid-folder
  variables = jax.device_put(variables)

  @jax.jit
  def outputs(v, batch):
    inputs = {name: classification.normalize(batch[name], mode) for name in fields}
    out = model.predict(v, inputs)
    probs = jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)
    return probs, out.get("attention")

  def predict(batch):
    probs, attention = outputs(variables, {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(probs), None if attention is None else np.asarray(attention, np.float32)

  return Predictor(description=f"{config.model.name} classifier of {workdir}", class_names=names, fields=fields,
                   image_size=crop or size, preprocess=_pad_resize_preprocess(size, crop), predict=predict,
                   input_box=padded_square_box(size, crop))


def load_upstream_predictor(path: str, *, text_dir: str | None, classes: list[str] | None,
                            template: str | None = None, image_size: int | None = None) -> Predictor:
  """A zero-shot predictor for a released FLAIR / KeepFIT PyTorch checkpoint (ResNet-50 + BERT)."""
  if not text_dir:
    raise ValueError(f"--checkpoint {path} is an upstream FLAIR/KeepFIT checkpoint: pass --text_dir, the local "
                     "Bio_ClinicalBERT directory (config.json + vocab) its text tower was built with")
  if not classes:
    raise ValueError(f"--checkpoint {path} is an upstream checkpoint with no class list: name the classes with "
                     "--classes \"class a,class b,...\"")
  return _two_tower_predictor(inference.load_two_tower(path, text_dir=text_dir), classes, template, image_size,
                              _flair_preprocess)


def _two_tower_predictor(run, classes, template, image_size, preprocess) -> Predictor:
  """Zero-shot over ``classes`` (default: the run's own zero-shot classes)."""
  classes = list(classes or run.classes)
  if not classes:
    raise ValueError(f"{run.description} has no zero_shot evaluator with classes in its config: name the classes "
                     "with --classes \"class a,class b,...\"")
  settings = dict(run.prompt, template=template or run.prompt["template"])
  protos = _prototypes(run.model, run.variables, run.tokenizer, classes, settings, run.max_length)
  size = int(image_size or run.image_size)
  return Predictor(description=f"{run.description} (zero-shot)", class_names=classes, fields={"image": 3},
                   image_size=size, preprocess=preprocess(size),
                   predict=_zero_shot_predict(run.model, run.variables, protos))


def load_predictor(checkpoint: str, **kwargs) -> Predictor:
  """``checkpoint``: a jaxretina workdir or an upstream FLAIR/KeepFIT weights file."""
  if fileio.isdir(checkpoint):  # a workdir, local or gs://
    kwargs.pop("text_dir", None)
    return load_workdir_predictor(checkpoint, **kwargs)
  if os.path.isfile(checkpoint):
    if not checkpoint.lower().endswith(inference.UPSTREAM_EXTENSIONS):
      raise ValueError(f"--checkpoint {checkpoint}: expected a jaxretina workdir (a directory) or an upstream "
                       f"FLAIR/KeepFIT checkpoint ({', '.join(inference.UPSTREAM_EXTENSIONS)})")
    kwargs.pop("step", None)
    if kwargs.pop("best", False):
      raise ValueError(f"--best: {checkpoint} is an upstream weights file, not a workdir with a best checkpoint")
    return load_upstream_predictor(checkpoint, **kwargs)
  raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or directory (expected a jaxretina workdir or "
                          "an upstream FLAIR/KeepFIT .pth)")


# ---------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Result:
  entry: Entry
  probabilities: np.ndarray | None = None
  heatmap: str | None = None


def _error_text(e: BaseException) -> str:
  return " ".join(f"{type(e).__name__}: {e}".split())


def _load_entry(predictor: Predictor, entry: Entry, fov_crop: bool):
  """Model inputs and the images as read (after ``--fov_crop``) of one entry, or the reason it cannot
  be read (a string)."""
  inputs, images = {}, {}
  for k, ((field, channels), path) in enumerate(zip(predictor.fields.items(), entry.paths)):
    try:
      image = read_image(path, channels)
      if fov_crop and k == 0:
        image = crop_fov(image)
      inputs[field], images[field] = predictor.preprocess(image, field), image
    except Exception as e:  # noqa: BLE001 - any decoder/preprocessing failure skips this file only
      where = f" ({os.path.basename(path)})" if len(entry.paths) > 1 else ""
      return f"unreadable{where}: {_error_text(e)}"
  return inputs, images


def _heatmap_names(entries: Sequence[Entry]) -> list[str]:
  names, seen = [], {}
  for entry in entries:
    stem = _stem(entry.paths[0])
    count = seen.get(stem, 0)
    seen[stem] = count + 1
    names.append(stem if count == 0 else f"{stem}_{count}")
  return names


def run(predictor: Predictor, entries: Sequence[Entry], out_dir: str, *, batch_size: int = 16,
        fov_crop: bool = False, log: Callable[[str], None] = print) -> list[Result]:
  """Predicts ``entries`` in fixed-size batches (one compilation); writes heatmaps under ``out_dir``."""
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  results = [Result(e) for e in entries]
  names = _heatmap_names(entries)
  todo = [i for i, e in enumerate(entries) if e.status == OK]
  s = predictor.image_size
  done = 0
  for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    loaded = []
    for i in chunk:
      item = _load_entry(predictor, entries[i], fov_crop)
      if isinstance(item, str):
        results[i].entry = dataclasses.replace(entries[i], status=item)
      else:
        loaded.append((i, item))
    done += len(chunk)
    if not loaded:
      continue
    batch = {f: np.zeros((batch_size, s, s, c), np.float32) for f, c in predictor.fields.items()}
    for row, (_, (inputs, _)) in enumerate(loaded):
      for f in predictor.fields:
        batch[f][row] = inputs[f]
    probs, attention = predictor.predict(batch)
    first = next(iter(predictor.fields))
    input_box = predictor.input_box or padded_square_box(predictor.image_size)
    for row, (i, (_, images)) in enumerate(loaded):
      results[i].probabilities = probs[row]
      if attention is not None:
        image = images[first]
        top = int(np.argmax(probs[row]))
        title = (f"{os.path.basename(entries[i].paths[0])}: {predictor.class_names[top]} "
                 f"({float(probs[row][top]):.2f})")
        path = fileio.join(out_dir, "heatmaps", names[i] + ".png")
        try:
          plots.save_heatmap_png(image, attention[row], path, box=input_box(image.shape[:2]), title=title)
          results[i].heatmap = path
        except ValueError as e:  # a non-finite map: keep the prediction, say why there is no overlay
          results[i].entry = dataclasses.replace(entries[i], status=f"ok (no heatmap: {_error_text(e)})")
    log(f"  {done}/{len(todo)} images")
  return results


def write_csv(results: Sequence[Result], class_names: Sequence[str], fields: Sequence[str], path: str) -> str:
  """Writes the predictions CSV atomically (local or gs://); returns the path."""
  file_columns = ["file"] + [f"file_{f}" for f in list(fields)[1:]]
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(file_columns + ["predicted"] + [f"prob_{c}" for c in class_names] + ["status"])
  for r in results:
    files = list(r.entry.paths) + [""] * (len(file_columns) - len(r.entry.paths))
    if r.probabilities is None:
      writer.writerow(files + [""] + [""] * len(class_names) + [r.entry.status])
    else:
      p = r.probabilities
      writer.writerow(files + [class_names[int(np.argmax(p))]] + [f"{v:.6f}" for v in p] + [r.entry.status])
  return fileio.write_text(path, text.getvalue())


def format_table(results: Sequence[Result], class_names: Sequence[str], max_rows: int = 30) -> str:
  rows = []
  for r in results:
    name = os.path.basename(r.entry.paths[0])
    if r.probabilities is None:
      rows.append((name, "-", "-", r.entry.status))
    else:
      k = int(np.argmax(r.probabilities))
      rows.append((name, class_names[k], f"{r.probabilities[k]:.3f}", r.entry.status))
  header = ("file", "predicted", "prob", "status")
  shown = rows[:max_rows]
  widths = [min(max(len(str(x[c])) for x in [header] + shown), 48) for c in range(3)]
  lines = ["  ".join(str(x[c])[:widths[c]].ljust(widths[c]) for c in range(3)) + "  " + x[3]
           for x in [header] + shown]
  if len(rows) > max_rows:
    lines.append(f"... {len(rows) - max_rows} more rows in the CSV")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m jaxretina.predict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="a jaxretina workdir, or an upstream FLAIR/KeepFIT .pth (then --text_dir is required)")
  p.add_argument("--images", nargs="+", required=True, help="image files or folders (recursive)")
  p.add_argument("--images2", nargs="+", default=None,
                 help="second modality of two-modality classifiers (CRD-Net), paired with --images")
  p.add_argument("--out", required=True, help="output folder (predictions.csv, heatmaps/)")
  p.add_argument("--classes", default=None, help="comma-separated class names (zero-shot classes; or renames a "
                                                 "classifier's classes)")
  p.add_argument("--template", default=None, help="zero-shot prompt template with [CLS] (default: the run's, or "
                                                  "FLAIR's 'A fundus photograph of [CLS]')")
  p.add_argument("--text_dir", default=None, help="local Bio_ClinicalBERT directory for upstream checkpoints")
  p.add_argument("--image_size", type=int, default=None, help="model input size (default: the run's; FLAIR 512)")
  p.add_argument("--fov_crop", action="store_true", help="crop fundus photographs to their field of view first")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--step", type=int, default=None, help="checkpoint step of a workdir (default: the latest)")
  p.add_argument("--best", action="store_true", help="a classifier workdir's best checkpoint (its best epoch-end "
                                                     "evaluation under config.early_stopping)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Result]:
  """Runs the CLI; returns the per-file results. Bad arguments raise (``cli`` prints them)."""
  args = parse_args(argv)
  if args.image_size is not None and args.image_size < 16:
    raise ValueError(f"--image_size must be >= 16, got {args.image_size}")
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
  classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes else None
  if args.classes is not None and not classes:
    raise ValueError(f"--classes {args.classes!r}: no class names")
  # Inputs are checked before the (slow) model load so that a typo fails at once.
  images, skipped = collect_images(args.images)
  images2, skipped2 = collect_images(args.images2, "--images2") if args.images2 else (None, [])
  predictor = load_predictor(args.checkpoint, step=args.step, classes=classes, template=args.template,
                             image_size=args.image_size, text_dir=args.text_dir,
                             **({"best": True} if args.best else {}))
  fields = list(predictor.fields)
  if len(fields) == 2:
    if images2 is None:
      raise ValueError(f"{predictor.description} takes two modalities {fields}: pass the {fields[1]!r} images "
                       "with --images2")
    entries = [Entry(pair) for pair in pair_images(images, images2, fields)]
  else:
    if images2 is not None:
      raise ValueError(f"--images2 given, but {predictor.description} takes one image modality")
    entries = [Entry((path,)) for path in images]
  entries += skipped + skipped2
  print(f"{predictor.description}: {len(predictor.class_names)} classes, {predictor.image_size} px, "
        f"{len(entries) - len(skipped) - len(skipped2)} inputs", flush=True)
  results = run(predictor, entries, args.out, batch_size=args.batch_size, fov_crop=args.fov_crop)
  csv_path = write_csv(results, predictor.class_names, fields, fileio.join(args.out, "predictions.csv"))
  print(format_table(results, predictor.class_names))
  failed = [r for r in results if r.probabilities is None]
  n_heat = sum(r.heatmap is not None for r in results)
  print(f"{len(results) - len(failed)} predicted, {len(failed)} skipped; wrote {csv_path}"
        + (f" and {n_heat} heatmaps under {fileio.join(args.out, 'heatmaps')}" if n_heat else ""))
  for r in failed:
    print(f"  skipped {r.entry.paths[0]}: {r.entry.status}")
  return results


def cli(argv: Sequence[str] | None = None) -> int:
  """``main`` for the command line: a bad argument prints one clear line and exits with status 2; status 1
  when every image was unreadable (the CSV still lists why)."""
  try:
    results = main(argv)
  except (FileNotFoundError, ValueError, IncompatibleCheckpointError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  return 0 if any(r.probabilities is not None for r in results) else 1  # 1: no file could be read


if __name__ == "__main__":
  sys.exit(cli())
