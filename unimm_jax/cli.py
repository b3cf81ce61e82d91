"""What the command lines share: a bad flag or a stop ends in one line on stderr and an exit status, not a
traceback. Used by scripts/train.py, demo.py and convert.py."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn

from absl import flags


def fail(prog: str, message: object, status: int) -> NoReturn:
  print(f"{prog}: {message}", file=sys.stderr)
  sys.exit(status)


def flags_parser(prog: str) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` (`app.run(main, flags_parser=...)`): an illegal value, an unknown config field
  (`--config.nosuch=1`) or variant (`--config cfg.py:huge`) ends as `prog: error: ...`, exit status 2."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, f"error: {e}", 2)
    except (KeyError, AttributeError, ValueError, TypeError) as e:  # raised by config files and config_flags
      text = str(e).strip("'\"")
      culprit = next((a for a in argv[1:] if a.startswith("--") and text.strip("'\"") in a), None)
      fail(prog, f"error: {culprit}: no such field or value {text!r}" if culprit else f"error: {text}", 2)

  return parse


def stopped(prog: str, e: KeyboardInterrupt, what: str) -> NoReturn:
  """Ends a script that Ctrl-C or SIGTERM (`sigterm_as_interrupt`) stopped: one line, status 128 + signal."""
  sig = signal.SIGTERM if "SIGTERM" in str(e) else signal.SIGINT
  fail(prog, f"{sig.name}: {what}", 128 + sig)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
  """SIGTERM raises KeyboardInterrupt inside the block, as Ctrl-C does, so clean-up on the way out runs
  (temporary directories, half-written files) instead of the process dying where it stands."""

  def handle(signum, frame):
    del signum, frame
    raise KeyboardInterrupt("SIGTERM")

  previous = signal.signal(signal.SIGTERM, handle)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
