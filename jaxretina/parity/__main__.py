"""``python -m jaxretina.parity PATH [PATH ...]``: run parity fixtures (or HF BERT directories).

Each PATH is a fixture directory in the format of ``docs/parity.md``, or a Hugging Face BERT
directory (``config.json`` + weights), which compares jaxretina's BERT with transformers' PyTorch
``BertModel`` on a fixed batch. Prints one line per case with its worst error, then
``N passed, M failed``; exits 0 only if every case passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from jaxretina import parity
from jaxretina.parity import hf_bert


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxretina.parity", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("paths", nargs="+", help="fixture directories or HF BERT directories")
  args = parser.parse_args(argv)

  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  passed = failed = 0
  for path in args.paths:
    t0 = time.perf_counter()
    if os.path.isfile(os.path.join(path, "meta.json")) or not os.path.isfile(os.path.join(path, "config.json")):
      result = parity.run_case(path)
    else:
      result = hf_bert.run_hf_bert_dir(path)
    dt = time.perf_counter() - t0
    status = "PASS" if result.passed else "FAIL"
    worst = (f"worst {result.worst_output} |err|={result.worst_abs_err:.2e} ({result.worst_ratio:.2f} of tol)"
             if result.worst_output else "")
    print(f"{status} {result.name:34s} {worst}  [{result.detail}] {dt:.1f}s", flush=True)
    passed += result.passed
    failed += not result.passed
  print(f"{passed} passed, {failed} failed")
  return 0 if failed == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
