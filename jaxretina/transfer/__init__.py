"""Transfer evaluation of FLAIR / KeepFIT two-tower models (docs/systems.md#transfer-evaluation-protocol).

* ``protocol``: the protocol's config and defaults (``get_config``), and its checks.
* ``runner``: runs the protocol on a loaded model (``run_protocol``) and writes its reports.

Building blocks that work on already-extracted image features:

* ``splits``: FLAIR's seeded per-class train/val/test selection and the experiments' label sets.
* ``linear_probe``: a jitted logistic-regression solver matching scikit-learn's
  ``LogisticRegression(C=0.316, class_weight='balanced')`` used by FLAIR's ``lp``.
* ``adapters``: zero-shot scoring, CLIP-Adapter, Tip-Adapter and Tip-Adapter-f trained with Optax.
"""
