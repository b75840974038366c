"""Huge pages for the host memory XLA:CPU allocates each step (glibc on Linux).

XLA:CPU allocates the temporaries of each execution as one block and frees it when the execution
ends: 1.1 GB for a ResNet-50 training step at batch 8. glibc's malloc serves a block that large with
a fresh ``mmap`` and returns it with ``munmap``, so every step the kernel maps and zero-fills it again,
one 4 KiB page fault at a time: about 300,000 faults and 0.5–0.6 CPU-seconds of system time per step
there (PyTorch's step: 40,000), 20 % of the step's wall time. With transparent huge pages the same
block takes a few thousand 2 MiB faults: 1.33–1.36 s per step instead of 1.66–1.72 s. (CRD-Net's
paper-size step, 3 GB of temporaries, loses its faults but not its time: the kernel zeroes each 2 MiB
page at once, and the cache misses that follow cost what the faults did.)

Linux backs memory with huge pages where the kernel's policy allows it
(``/sys/kernel/mm/transparent_hugepage/enabled``): ``always`` does it everywhere; ``madvise``, the
common default, only where a program asks, which glibc (2.35 and later) does for its allocations
when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. glibc reads that setting only when a
process starts, so the command-line jobs (``python -m jaxretina.main``, ``.bench``, ``.evaluate``,
``.predict``) call ``restart_with_huge_pages`` before their imports: it re-executes the same command,
same process id, with the setting added. Nothing else changes: values are bit for bit the same, and memory is
still returned to the system after each step.

``JAXRETINA_HUGE_PAGES``: ``auto`` (the default) restarts when JAX will run on the CPU (no GPU/TPU
plugin installed, or ``JAX_PLATFORMS`` names ``cpu`` first): on accelerators the step's temporaries
live in device memory. ``1`` restarts on any platform; ``0`` never. Scripts that call the library
directly can start Python with the variable set: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

SWITCH = "JAXRETINA_HUGE_PAGES"
SWITCH_VALUES = ("auto", "1", "0")
_HUGETLB = "glibc.malloc.hugetlb"
TUNABLE = f"{_HUGETLB}=1"
# Set by the restart, to the GLIBC_TUNABLES the process was started with ('' for none): it marks the
# restart (there is at most one) and lets child processes that are not ours get the original back.
RESTARTED = "JAXRETINA_HUGE_PAGES_RESTARTED_FROM"
THP_POLICY_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_GLIBC_WITH_HUGETLB = (2, 35)


def restart_with_huge_pages() -> None:
  """Re-executes this process's command with glibc's huge-page setting, where that helps (above).

  Returns (doing nothing) when it would not: the reason is what ``status()`` reports. Call it before
  anything that takes time (imports of JAX and the models): exec starts the process over.
  """
  environment = huge_page_environment()
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), environment)
  except OSError as e:  # the process goes on as it is; status() then reports 4 KiB pages
    print(f"warning: could not restart {sys.executable} with {TUNABLE} ({e}); "
          f"set {SWITCH}=0 to skip the attempt", file=sys.stderr)


def huge_page_environment() -> dict[str, str] | None:
  """This process's environment with glibc's huge-page setting added, for a process started with it
  (this one, restarted, or children started before any of them allocates); None where
  ``why_not_restart`` gives a reason."""
  if why_not_restart():
    return None
  environment = dict(os.environ)
  original = environment.get("GLIBC_TUNABLES", "")
  environment["GLIBC_TUNABLES"] = f"{original}:{TUNABLE}" if original else TUNABLE
  environment[RESTARTED] = original
  return environment


def why_not_restart() -> str:
  """Why ``restart_with_huge_pages`` would leave the process as it is ('' when it would restart)."""
  switch = os.environ.get(SWITCH, "auto")
  if switch not in SWITCH_VALUES:
    raise ValueError(f"{SWITCH}={switch!r}: expected one of {', '.join(SWITCH_VALUES)}")
  if switch == "0":
    return f"{SWITCH}=0"
  if RESTARTED in os.environ:
    return "restarted with it already"
  if _HUGETLB in _glibc_tunables():
    return f"GLIBC_TUNABLES sets {_HUGETLB} already"
  unsupported = _unsupported()
  if unsupported:
    return unsupported
  policy = thp_policy()
  if policy == "always":
    return "the kernel backs large blocks with huge pages already (transparent_hugepage=always)"
  if policy != "madvise":
    return f"the kernel does not give huge pages (transparent_hugepage={policy})"
  if switch == "auto":
    accelerator = _accelerator_expected()
    if accelerator:
      return f"JAX will run on an accelerator ({accelerator}; {SWITCH}=1 restarts anyway)"
  if not getattr(sys, "orig_argv", None) or not sys.executable:
    return "the command line of this process is unknown"
  return ""


def status() -> str:
  """The pages this process's large host allocations get, and why: for logs and the benchmark."""
  policy = thp_policy()
  if policy == "always":
    return "huge pages (transparent_hugepage=always)"
  if policy == "madvise" and _glibc_tunables().get(_HUGETLB) in ("1", "2") and not _unsupported():
    return f"huge pages (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}, transparent_hugepage=madvise)"
  return f"4 KiB pages ({why_not_restart() or f'start the process with GLIBC_TUNABLES={TUNABLE} for huge ones'})"


def original_environment() -> dict[str, str]:
  """This process's environment as it was before the restart: for child processes that must run as
  they would without jaxretina (the PyTorch reference of ``jaxretina.bench --against_torch``)."""
  environment = dict(os.environ)
  if RESTARTED in environment:
    original = environment.pop(RESTARTED)
    if original:
      environment["GLIBC_TUNABLES"] = original
    else:
      environment.pop("GLIBC_TUNABLES", None)
  return environment


def _glibc_tunables() -> dict[str, str]:
  """``GLIBC_TUNABLES`` (``name=value:name=value``) as a mapping."""
  items = os.environ.get("GLIBC_TUNABLES", "").split(":")
  return dict(item.partition("=")[::2] for item in items if item)


def thp_policy() -> str:
  """The kernel's transparent-huge-page policy ('always', 'madvise', 'never'), or why it is unknown."""
  try:
    with open(THP_POLICY_FILE) as f:
      text = f.read()
  except OSError:
    return "unknown: no " + THP_POLICY_FILE
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else f"unknown: {text.strip()!r}"


def _unsupported() -> str:
  library, version = platform.libc_ver()
  if platform.system() != "Linux" or library != "glibc":
    return f"not Linux with glibc ({platform.system()}, {library or 'unknown C library'})"
  try:
    numbers = tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return f"glibc version {version!r} not understood"
  if numbers < _GLIBC_WITH_HUGETLB:
    return f"glibc {version} has no glibc.malloc.hugetlb (2.35 or later has)"
  return ""


def _accelerator_expected() -> str:
  """Why JAX is expected to run on a GPU/TPU here, or '' when on the CPU; JAX itself is not imported."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    first = platforms.split(",")[0].strip()
    return "" if first == "cpu" else f"JAX_PLATFORMS={platforms}"
  if importlib.util.find_spec("libtpu") is not None:
    return "libtpu is installed"
  plugins = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
  if importlib.util.find_spec("jax_plugins") is not None:
    import pkgutil

    import jax_plugins

    plugins += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  return f"JAX plugins installed: {', '.join(sorted(set(plugins)))}" if plugins else ""
