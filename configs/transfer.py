r"""Transfer evaluation of a FLAIR / KeepFIT two-tower model (FLAIR's ``main_transferability.py``).

One command per row of KeepFIT's tables (docs/systems.md#transfer-evaluation-protocol,
docs/systems.md#keepfit-and-flair-results):

  python -m jaxretina.evaluate --config configs/transfer.py:experiment=08_ODIR200x3,method=zero_shot \
    --checkpoint /weights/keepfit_flair+mm.pth --config.text_dir=/weights/Bio_ClinicalBERT \
    --config.data.dataframe_dir=/data/MM-Retinal/KeepFIT/local_data/dataframes/transferability \
    --config.data.root=/data/FLAIR_datasets

``--checkpoint`` is a jaxretina contrastive workdir or a released FLAIR/KeepFIT ``.pth`` (then
``text_dir`` names the local Bio_ClinicalBERT directory). ``experiment`` is one of
``jaxretina.transfer.splits.EXPERIMENTS`` (its CSV is read from ``data.dataframe_dir``, image paths
resolved under ``data.root``) or ``synthetic`` (the embedded synthetic retina test split; no download).

Arguments (``:a=b,c=d``): ``experiment``, ``method`` (zero_shot | lp | clip_adapter | tip_adapter |
tip_adapter_f | finetune; FLAIR's spellings clipAdapter / tipAdapter / tipAdapter-f / FT also work),
``shots_train``, ``shots_val``, ``shots_test`` ("k%" per class or a count per class), ``folds``,
``tta``, ``fta``. Unset, the shots and folds are each method's usual protocol: zero-shot on 100 % of
every class (1 fold); LP, adapters and fine-tuning 80 % / 20 % train / test, 5 folds (FLAIR's own
argparse defaults are 0 % / 100 % and 1 fold for every method). Examples:

  # Few-shot (KeepFIT's ODIR200x3 columns): 5 shots per class, 20 % test, 5 folds
  python -m jaxretina.evaluate --config configs/transfer.py:experiment=08_ODIR200x3,method=clip_adapter,shots_train=5
  # Linear probe on raw 2048-d features (FLAIR README: project_features False)
  python -m jaxretina.evaluate --config configs/transfer.py:experiment=25_REFUGE,method=lp,shots_train=20%
  # Local demo on a run of configs/keepfit.py (no data or weights needed)
  python -m jaxretina.evaluate --config configs/transfer.py:method=lp --checkpoint /tmp/keepfit

The defaults live in the package (``jaxretina.transfer.protocol``), so an installed jaxretina without
this folder runs the same with ``--config=:ARG`` (e.g. ``--config=:method=lp``). ``project_features``
defaults per method: True for zero-shot and the adapters (they score against the 512-d text
prototypes), False for lp and finetune (FLAIR's README). Upstream KeepFIT's README writes
``-- project_features True`` which argparse silently drops; that quirk is not reproduced.
"""

from jaxretina.transfer import protocol


def get_config(arg=None):
  return protocol.get_config(arg)
