"""Shared test set-up: CPU, 8 fake devices, full-precision matmuls, and the parity fixture location."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Trainer tests rebuild identical programs (each run jits its own step); a persistent cache makes the
# second and later compiles of the same program a disk read. Subprocess tests inherit it via env.
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"jaxretina-test-jit-cache-{os.getuid()}"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
  # pytest-xdist starts its workers after this, with this environment: their XLA:CPU steps get the
  # host memory the command-line jobs get (jaxretina.host_memory). The controller itself runs no steps.
  if config.getoption("numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
    from jaxretina import host_memory

    os.environ.update(host_memory.step_environment() or {})


def parity_dir() -> str:
  """``$JAXRETINA_PARITY_DIR``, else ``../shared/parity`` beside the checkout."""
  return os.environ.get("JAXRETINA_PARITY_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared", "parity")


def parity_train_dir() -> str:
  """``$JAXRETINA_PARITY_TRAIN_DIR``, else ``parity-train`` beside the forward fixtures."""
  return os.environ.get("JAXRETINA_PARITY_TRAIN_DIR") or os.path.join(os.path.dirname(
      os.path.normpath(parity_dir())), "parity-train")


def require_parity_dir(d: str | None = None) -> str:
  """The fixture directory (default: the forward one); skips visibly where absent, fails instead
  when CI demands them."""
  d = d or parity_dir()
  if not os.path.isdir(d):
    msg = f"parity fixtures not found at {d} (set JAXRETINA_PARITY_DIR / JAXRETINA_PARITY_TRAIN_DIR)"
    if os.environ.get("JAXRETINA_REQUIRE_PARITY") == "1":
      pytest.fail(msg + " and JAXRETINA_REQUIRE_PARITY=1 forbids skipping")
    pytest.skip(msg)
  return d
