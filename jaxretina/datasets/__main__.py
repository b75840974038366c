"""Command line of jaxretina's TFDS builders.

  python -m jaxretina.datasets list
  python -m jaxretina.datasets build NAME --data_dir DIR [--manual_dir DIR] [--config NAME] [--option value ...]

``build`` prepares the ArrayRecord dataset NAME (any TFDS builder registered after importing
``jaxretina.datasets``) and prints the per-split counts it wrote and the path of its skip report.
Every ``--option value`` not listed above becomes a builder keyword (``--canvas_size 256
--on_bad_input skip --num_workers 4``; ``--flag`` alone means true; several values, or a repeated
option, give a list: ``--csv a.csv b.csv``); values that look like integers are passed as integers.
Bad input exits with status 2 and the builder's message, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import jaxretina.datasets
from jaxretina.datasets import manual_builder
from jaxretina.datasets import bad_input

_EXIT_BAD_INPUT = 2


def _value(text: str):
  try:
    return int(text)
  except ValueError:
    return text


def _parse_options(extra: list[str]) -> dict:
  """``['--canvas_size', '256', '--crop_fov']`` → ``{'canvas_size': 256, 'crop_fov': True}``.

  An option followed by several values, or given several times, becomes a list
  (``--csv a.csv b.csv`` or ``--csv a.csv --csv b.csv`` → ``{'csv': ['a.csv', 'b.csv']}``).
  """
  options, i = {}, 0
  while i < len(extra):
    token = extra[i]
    if not token.startswith("--") or len(token) <= 2:
      raise ValueError(f"unexpected argument {token!r}: builder options are written --name value")
    key, _, value = token[2:].partition("=")
    key = key.replace("-", "_")
    values = [value] if _ else []
    while not _ and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
      values.append(extra[i + 1])
      i += 1
    parsed = [_value(v) for v in values] or ["true"]
    if key in options:
      previous = options[key] if isinstance(options[key], list) else [options[key]]
      options[key] = previous + parsed
    else:
      options[key] = parsed[0] if len(parsed) == 1 else parsed
    i += 1
  return options


def _registered_names() -> list[str]:
  import tensorflow_datasets as tfds

  # Community datasets are looked up on GCS (no network here, and not jaxretina's concern).
  return sorted(tfds.list_builders(with_community_datasets=False))


def _jaxretina_builders() -> dict:
  """name → builder class of every builder defined in a loaded ``jaxretina.*`` module."""
  import inspect

  import tensorflow_datasets as tfds

  registered = set(_registered_names())
  found = {}
  for module_name, module in sorted(sys.modules.items()):
    if not module_name.startswith("jaxretina.") or module is None:
      continue
    for _, cls in inspect.getmembers(module, inspect.isclass):
      if (issubclass(cls, tfds.core.DatasetBuilder) and cls.__module__ == module_name
          and not inspect.isabstract(cls) and getattr(cls, "name", None) in registered):
        found[cls.name] = cls
  return dict(sorted(found.items()))


def _list() -> int:
  for name, cls in _jaxretina_builders().items():
    configs = [c.name for c in (cls.BUILDER_CONFIGS or [])]
    manual = " (manual download)" if getattr(cls, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) else ""
    doc = (cls.__doc__ or "").strip().splitlines()
    print(f"{name}{manual}  configs: {', '.join(configs) or '-'}  — {doc[0] if doc else ''}")
  return 0


def _build(args, options: dict) -> int:
  import tensorflow_datasets as tfds

  if args.name not in _registered_names():
    print(f"error: no dataset named {args.name!r}; jaxretina builders: {', '.join(_jaxretina_builders())}",
          file=sys.stderr)
    return _EXIT_BAD_INPUT
  if args.config:
    options["config"] = args.config
  if args.manual_dir and issubclass(tfds.builder_cls(args.name), manual_builder.ManualRetinaBuilder):
    options["manual_dir"] = args.manual_dir  # image_folder reads its class names from the tree at construction
  builder = tfds.builder(args.name, data_dir=args.data_dir, **options)
  label = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
  if builder.is_prepared():
    print(f"{label} is already prepared in {builder.data_dir}")
  else:
    os.makedirs(args.data_dir, exist_ok=True)
    download_config = tfds.download.DownloadConfig(manual_dir=args.manual_dir) if args.manual_dir else None
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    print(f"built {label} in {builder.data_dir}")
  for split, info in sorted(builder.info.splits.items()):
    print(f"  {split}: {info.num_examples} examples")
  report = getattr(builder, "skip_report_path", None)
  if report is not None and os.path.exists(report):
    skipped = getattr(builder, "skip_report", None)
    count = f" ({len(skipped.skipped)} skipped)" if skipped is not None else ""
    print(f"skip report{count}: {report}")
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m jaxretina.datasets", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="list jaxretina's TFDS builders")
  build = commands.add_parser("build", help="prepare a dataset (ArrayRecord)")
  build.add_argument("name", help="registered builder name, e.g. aptos2019")
  build.add_argument("--data_dir", required=True, help="TFDS data directory to write to")
  build.add_argument("--manual_dir", default=None, help="folder holding the manual download")
  build.add_argument("--config", default=None, help="builder config name")
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  if args.command == "list":
    if extra:
      parser.error(f"unexpected arguments {extra}")
    return _list()
  try:
    options = _parse_options(extra)
  except ValueError as e:
    parser.error(str(e))
  try:
    return _build(args, options)
  except (bad_input.DatasetInputError, ValueError, TypeError) as e:
    # Bad input (DatasetInputError is a ValueError), unknown options or config (TFDS reports those as
    # ValueError/TypeError naming the keyword): the message says what and where; a traceback adds nothing.
    print(f"error: {e}", file=sys.stderr)
    return _EXIT_BAD_INPUT


if __name__ == "__main__":
  sys.exit(main())
