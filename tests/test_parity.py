"""Every fixture in the parity directory must pass through ``jaxretina.parity``."""

import os

import pytest

from conftest import parity_dir, require_parity_dir


def _cases():
  d = parity_dir()
  if not os.path.isdir(d):
    return ["<missing>"]
  return sorted(c for c in os.listdir(d) if os.path.isfile(os.path.join(d, c, "meta.json")))


@pytest.mark.parity
@pytest.mark.parametrize("case", _cases())
def test_fixture(case):
  d = require_parity_dir()
  from jaxretina import parity

  result = parity.run_case(os.path.join(d, case))
  assert result.passed, f"{case}: {result.detail}"
