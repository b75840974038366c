"""Every fixture in the parity directories must pass through ``jaxretina.parity``: the forward cases
and the one-training-step cases (``parity-train``, run through the trainers' own step code)."""

import os

import pytest

from conftest import parity_dir, parity_train_dir, require_parity_dir

# One training step per system; every other case found beside them runs too.
TRAIN_STEP_CASES = ("keepfit_train_step", "flair_train_step", "crdnet_train_step", "bira_train_step",
                    "fcnclip_train_step", "dam_train_step", "cal_train_step")


def _cases(d):
  if not os.path.isdir(d):
    return ["<missing>"]
  return sorted(c for c in os.listdir(d) if os.path.isfile(os.path.join(d, c, "meta.json")))


@pytest.mark.parity
@pytest.mark.parametrize("case", _cases(parity_dir()))
def test_fixture(case):
  d = require_parity_dir()
  from jaxretina import parity

  result = parity.run_case(os.path.join(d, case))
  assert result.passed, f"{case}: {result.detail}"


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(set(TRAIN_STEP_CASES) | set(c for c in _cases(parity_train_dir())
                                                                      if c != "<missing>")))
def test_train_step_fixture(case):
  d = require_parity_dir(parity_train_dir())
  from jaxretina import parity

  path = os.path.join(d, case)
  if not os.path.isdir(path):
    pytest.fail(f"train-step fixture {case} missing from {d}")
  result = parity.run_case(path)
  assert result.passed, f"{case}: {result.detail}"
