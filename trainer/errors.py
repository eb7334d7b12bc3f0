"""How the trainer fails, and the exit code each failure maps to.

Exit codes (the operator's retry policy reads them):
  0  finished, or preempted with a checkpoint saved (SIGTERM)
  1  any other failure (S3 outage, a bug, out of memory, ...). The operator does not retry it unless
     runPolicy.retriableExitCodes lists 1; signals (exit >= 128) and disruptions are always retried.
  2  invalid input: a bad spec, bad data or an unknown name; retrying cannot help
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


class InvalidInput(Exception):
    """The spec or the data is wrong; the message names the field or the file to fix."""


def one_line(exc: BaseException) -> str:
    """The gist of an exception in one line, prefixed with its type unless it is an InvalidInput.

    Errors re-raised from DataLoader workers carry the worker's traceback; their last line is the gist.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1].split(": ", 1)[-1] if lines[0].startswith("Caught ") else lines[0]
    return text if isinstance(exc, InvalidInput) else f"{type(exc).__name__}: {text}"
