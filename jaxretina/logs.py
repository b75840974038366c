"""Logging of the command-line tools: our own INFO lines, third-party libraries from WARNING up."""

from __future__ import annotations

import logging
import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class QuietThirdPartyLogs(logging.Filter):
  """Our own INFO lines (progress, resume, timings) pass; third-party records pass from WARNING up,
  as one line without their traceback, except two kinds that only repeat a failure we report in one
  line ourselves (``jaxretina.train.checkpoint``): Orbax's errors, and asyncio's "exception was never
  retrieved" for each of the TensorStore writes that a failed save abandons (hundreds of them)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    if record.levelno < logging.WARNING or record.name == "asyncio":
      return False
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


def debug_requested(flag: bool = False) -> bool:
  """``--debug`` or ``JAXRETINA_DEBUG=1``: full tracebacks and every library's INFO lines."""
  return flag or os.environ.get("JAXRETINA_DEBUG", "") not in ("", "0")


def configure(debug: bool) -> None:
  """INFO for jaxretina; with ``debug`` every library's INFO and tracebacks too."""
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  if not debug:
    for handler in root.handlers or [logging.lastResort]:
      handler.addFilter(QuietThirdPartyLogs())
