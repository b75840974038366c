"""Host memory for the temporaries XLA:CPU allocates each step: jemalloc, or glibc with huge pages.

XLA:CPU allocates the temporaries of each execution as one block and frees it when the execution
ends: 1.1 GB for a ResNet-50 training step at batch 8, 4 GB for the KeepFIT benchmark row. glibc's
malloc serves a block that large with a fresh ``mmap`` and returns it with ``munmap``, so every step
the kernel maps the block again and zero-fills it, one 4 KiB page fault at a time: about 300,000
faults and 0.5–0.6 CPU-seconds of system time per ResNet-50 step (PyTorch's step: 40,000), 20 % of
its wall time. On a virtual machine that hands freed memory back to its host (virtio-balloon free
page reporting), each of those pages is also fetched from the host again.

Two remedies, chosen by ``JAXRETINA_HOST_MEMORY``:

* ``jemalloc``: the process runs with jemalloc preloaded (``LD_PRELOAD``), which keeps freed memory
  mapped and gives it to the next step, so it is not zero-filled again (KeepFIT's row: 0–1,000 faults
  and 0.01–0.3 s of system time per step against 2,500 and 0.7–1.6 s with huge pages, and 6.2–6.6
  against 6.8–7.6 s per step). It is configured with ``MALLOC_CONF`` (``MALLOC_CONF`` below, unless
  the user sets their own): memory freed and not reused is returned to the system by a background
  thread after about 10 s, and large blocks get transparent huge pages. The cost is memory: freed
  blocks wait in jemalloc's arenas, and the benchmark rows' peak RSS is 1.7–2.7 GB higher.
  jemalloc comes from the system (Debian/Ubuntu ``apt-get install libjemalloc2``, Fedora
  ``dnf install jemalloc``, conda ``jemalloc``); ``JAXRETINA_JEMALLOC`` names the library file when it
  is elsewhere.
* ``huge_pages``: glibc backs its allocations with transparent huge pages
  (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35 or later, where the kernel's policy in
  ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise``): a few thousand 2 MiB faults instead
  of hundreds of thousands (ResNet-50: 1.33–1.36 s per step instead of 1.66–1.72 s), but the block is
  still zero-filled every step.

Both are read by the dynamic loader and libc only when a process starts, so the command-line jobs
(``python -m jaxretina.main``, ``.bench``, ``.evaluate``, ``.predict``) call ``restart`` before their
imports: it re-executes the same command, same process id, with the settings added. Values are bit for
bit the same whichever memory the step gets.

``JAXRETINA_HOST_MEMORY``: ``auto`` (the default) restarts when JAX will run on the CPU (no GPU/TPU
plugin installed, or ``JAX_PLATFORMS`` names ``cpu`` first; on accelerators the temporaries live in
device memory), with jemalloc where it is installed and huge pages otherwise. ``jemalloc`` and
``huge_pages`` choose one on any platform; ``off`` never restarts. Scripts that call the library
directly can start Python with the same environment (see ``step_environment``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys

SWITCH = "JAXRETINA_HOST_MEMORY"
SWITCH_VALUES = ("auto", "jemalloc", "huge_pages", "off")
_RENAMED_SWITCH = "JAXRETINA_HUGE_PAGES"  # the switch's name before jemalloc: 1 → huge_pages, 0 → off
JEMALLOC = "JAXRETINA_JEMALLOC"
JEMALLOC_NAMES = ("libjemalloc.so.2", "libjemalloc.so")
_JEMALLOC_DIRECTORIES = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                         "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# jemalloc gives blocks of 8 MiB and more an arena of their own that hands them back to the system at
# once (at any decay it purged most of a freed 4 GB block during the next step: 35,000 faults a step);
# oversize_threshold:0 keeps them in the ordinary arenas, where a freed block waits dirty_decay_ms
# (default 10 s) and the next step reuses it. Never purging (dirty_decay_ms:-1) was as fast but kept
# blocks of other sizes too: CRD-Net's process grew from 5.2 to 8.1 GB.
MALLOC_CONF = "oversize_threshold:0,background_thread:true,thp:always"
_HUGETLB = "glibc.malloc.hugetlb"
TUNABLE = f"{_HUGETLB}=1"
# Set by the restart, to a JSON mapping of each variable it changed to the value the process was started
# with (null: unset): it marks the restart (there is at most one) and gives child processes that are
# not ours (the PyTorch reference of jaxretina.bench --against_torch) the original environment back.
RESTARTED = "JAXRETINA_HOST_MEMORY_RESTARTED_FROM"
THP_POLICY_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_GLIBC_WITH_HUGETLB = (2, 35)


def restart() -> None:
  """Re-executes this process's command with the host-memory settings above, where they help.

  Returns (doing nothing) when they would not: the reason is what ``status()`` reports. Call it before
  anything that takes time (imports of JAX and the models): exec starts the process over.
  """
  environment = step_environment()
  if environment is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, list(sys.orig_argv), environment)
  except OSError as e:  # the process goes on as it is; status() then reports 4 KiB pages
    print(f"warning: could not restart {sys.executable} with {_describe(environment)} ({e}); "
          f"set {SWITCH}=off to skip the attempt", file=sys.stderr)


def step_environment() -> dict[str, str] | None:
  """This process's environment with the chosen host-memory settings added, for a process started
  with it (this one, restarted, or children started before any of them allocates); None where
  ``why_not_restart`` gives a reason."""
  if why_not_restart():
    return None
  environment = dict(os.environ)
  changes = {}
  jemalloc = _chosen_jemalloc()
  if jemalloc:
    preload = environment.get("LD_PRELOAD", "")
    changes["LD_PRELOAD"] = f"{jemalloc}:{preload}" if preload else jemalloc
    if "MALLOC_CONF" not in environment:  # the user's own configuration wins
      changes["MALLOC_CONF"] = MALLOC_CONF
  else:
    tunables = environment.get("GLIBC_TUNABLES", "")
    changes["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
  environment[RESTARTED] = json.dumps({name: environment.get(name) for name in changes})
  environment.update(changes)
  return environment


def why_not_restart() -> str:
  """Why ``restart`` would leave the process as it is ('' when it would restart)."""
  switch = _switch()
  if switch == "off":
    return f"{SWITCH}=off"
  if RESTARTED in os.environ:
    return "restarted with it already"
  if switch == "auto":
    accelerator = _accelerator_expected()
    if accelerator:
      return f"JAX will run on an accelerator ({accelerator}; {SWITCH}=jemalloc or huge_pages restarts anyway)"
  if _jemalloc_loaded():
    return "jemalloc is loaded already"
  jemalloc = _chosen_jemalloc()
  if switch == "jemalloc" and not jemalloc:
    raise FileNotFoundError(
        f"{SWITCH}=jemalloc: no jemalloc library found (looked for {' or '.join(JEMALLOC_NAMES)} in "
        f"{', '.join(_jemalloc_directories())}); install it (apt-get install libjemalloc2) or set "
        f"{JEMALLOC}=/path/to/libjemalloc.so.2")
  if not getattr(sys, "orig_argv", None) or not sys.executable:
    return "the command line of this process is unknown"
  if jemalloc:
    return ""
  reason = _why_no_huge_pages()
  if reason and switch == "auto":
    return f"no jemalloc found; {reason}"
  return reason


def status() -> str:
  """What this process's large host allocations get, and why: for logs and the benchmark."""
  if _jemalloc_loaded():
    conf = os.environ.get("MALLOC_CONF")
    conf = f"MALLOC_CONF={conf}" if conf else "jemalloc's default configuration"
    return f"jemalloc ({conf}): freed memory is kept for the next step"
  policy = thp_policy()
  if policy == "always":
    return "huge pages (transparent_hugepage=always)"
  if policy == "madvise" and _glibc_tunables().get(_HUGETLB) in ("1", "2") and not _unsupported():
    return f"huge pages (GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}, transparent_hugepage=madvise)"
  try:
    reason = why_not_restart() or f"start the process with GLIBC_TUNABLES={TUNABLE} for huge ones"
  except (ValueError, FileNotFoundError) as e:  # a bad setting: the log says what is wrong with it
    reason = str(e)
  return f"4 KiB pages, fresh each step ({reason})"


def original_environment() -> dict[str, str]:
  """This process's environment as it was before the restart: for child processes that must run as
  they would without jaxretina (the PyTorch reference of ``jaxretina.bench --against_torch``)."""
  environment = dict(os.environ)
  if RESTARTED in environment:
    for name, value in json.loads(environment.pop(RESTARTED)).items():
      if value is None:
        environment.pop(name, None)
      else:
        environment[name] = value
  return environment


def find_jemalloc() -> str:
  """The jemalloc library to preload: ``$JAXRETINA_JEMALLOC``, else the first found in the system's
  library directories ('' when none is)."""
  named = os.environ.get(JEMALLOC)
  if named:
    if not os.path.isfile(named):
      raise FileNotFoundError(f"{JEMALLOC}={named}: no such file (expected the path of libjemalloc.so.2)")
    return named
  for directory in _jemalloc_directories():
    for name in JEMALLOC_NAMES:
      path = os.path.join(directory, name)
      if os.path.isfile(path):
        return path
  return ""


def thp_policy() -> str:
  """The kernel's transparent-huge-page policy ('always', 'madvise', 'never'), or why it is unknown."""
  try:
    with open(THP_POLICY_FILE) as f:
      text = f.read()
  except OSError:
    return "unknown: no " + THP_POLICY_FILE
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else f"unknown: {text.strip()!r}"


def _switch() -> str:
  if _RENAMED_SWITCH in os.environ:
    raise ValueError(f"{_RENAMED_SWITCH} is now {SWITCH} ({_RENAMED_SWITCH}=1 is {SWITCH}=huge_pages, "
                     f"=0 is {SWITCH}=off); unset {_RENAMED_SWITCH}")
  switch = os.environ.get(SWITCH, "auto")
  if switch not in SWITCH_VALUES:
    raise ValueError(f"{SWITCH}={switch!r}: expected one of {', '.join(SWITCH_VALUES)}")
  return switch


def _chosen_jemalloc() -> str:
  """The jemalloc library the switch asks for and this machine has ('' for none)."""
  return find_jemalloc() if _switch() in ("auto", "jemalloc") else ""


def _jemalloc_directories() -> list[str]:
  # A conda or virtual environment's own lib directory first: conda's jemalloc lives there.
  prefixes = [os.environ.get("CONDA_PREFIX", ""), sys.prefix]
  return [os.path.join(p, "lib") for p in prefixes if p] + list(_JEMALLOC_DIRECTORIES)


def _jemalloc_loaded() -> bool:
  """Whether jemalloc is mapped into this process (preloaded: it then serves every allocation)."""
  try:
    with open("/proc/self/maps") as f:
      return any("libjemalloc" in line for line in f)
  except OSError:
    return False


def _why_no_huge_pages() -> str:
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
  return ""


def _describe(environment: dict[str, str]) -> str:
  return ", ".join(f"{name}={environment[name]}" for name in json.loads(environment[RESTARTED]))


def _glibc_tunables() -> dict[str, str]:
  """``GLIBC_TUNABLES`` (``name=value:name=value``) as a mapping."""
  items = os.environ.get("GLIBC_TUNABLES", "").split(":")
  return dict(item.partition("=")[::2] for item in items if item)


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
