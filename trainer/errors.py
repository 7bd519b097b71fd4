"""User errors of train.py: the exception every part of trainer/ raises, and how it is reported."""
from __future__ import annotations

import re
import sys


class ConfigError(ValueError):
    """Every user error of train.py (config, command line, run folder, checkpoints, device): raised
    anywhere in trainer/, caught once in ``trainer.cli.main`` and reported as one line on stderr,
    exit code 2, no traceback."""


_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def error(message: str) -> int:
    """A user error: one line on stderr (no ANSI escapes, whatever the message quoted); returns
    exit code 2 (argparse's own convention)."""
    line = " ".join(_ESCAPES.sub("", str(message)).split())
    print(f"train.py: error: {line}", file=sys.stderr)
    return 2


def one_line(exc: BaseException) -> str:
    """The first sentence of an exception's first line (torch's messages go on for paragraphs)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")
