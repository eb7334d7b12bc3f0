"""How the trainer fails. ``InvalidInput`` becomes exit code 2 (``ExitCode.INVALID`` in kiln.api.contract, which
documents every code and what the operator's retry policy does with it); anything else becomes 1.
"""

from __future__ import annotations


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
