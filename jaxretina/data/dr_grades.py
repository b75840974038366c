"""The 5-grade ICDR diabetic-retinopathy scale, in one place.

Shared by the APTOS, EyePACS, Messidor-2, DDR and IDRiD builders, FLAIR's transfer experiments and the
FCN-CLIP prototypes; the texts are FLAIR's category texts (docs/datasets.md#flair-category-texts).
"""

from __future__ import annotations

# Class names of the builders' ``label`` feature, grade 0..4.
DR_GRADE_NAMES = ("no_dr", "mild", "moderate", "severe", "proliferative")
# FLAIR's category text of each grade (the zero-shot prompts' classes).
DR_CATEGORIES = ("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                 "severe diabetic retinopathy", "proliferative diabetic retinopathy")
# The extra label some sources give images that cannot be graded.
UNGRADABLE = "ungradable"


def dr_categories(grade: int) -> list[str]:
  """FLAIR-style category text of an ICDR grade 0–4."""
  return [DR_CATEGORIES[grade]]
