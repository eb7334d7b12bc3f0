"""How an export fails: each failure names its condition reason and exit code (kiln.api.contract.ExitCode),
so the operator's retry policy and ``kiln export`` read the verdict off the report, never off the message.

A failed verification is not an exception: every artifact is still written and measured, and the report
says which one missed verify.tolerance (``kiln.trainer.export.pipeline``).
"""

from __future__ import annotations

from typing import ClassVar

from kiln.api.contract import ExitCode
from kiln.api.status import Reason


class ExportError(Exception):
    reason: ClassVar[Reason] = Reason.EXPORT_FAILED
    exit_code: ClassVar[ExitCode] = ExitCode.FAILED


class InvalidSpec(ExportError):
    """The ExportJob spec cannot work with this checkpoint (an input shape the network refuses, ...)."""

    reason = Reason.INVALID_SPEC
    exit_code = ExitCode.INVALID


class SourceNotFound(ExportError):
    """No checkpoint at the URI: a wrong path, not an outage, so retrying cannot help."""

    reason = Reason.SOURCE_NOT_FOUND
    exit_code = ExitCode.INVALID


class SourceUnreadable(ExportError):
    """The checkpoint's store failed (S3 down, access denied): possibly transient."""

    reason = Reason.SOURCE_UNREADABLE
    exit_code = ExitCode.FAILED


class InvalidSource(ExportError):
    """The file is not a Kiln checkpoint of a task the exporter handles, or its network cannot be rebuilt."""

    reason = Reason.INVALID_SOURCE
    exit_code = ExitCode.INVALID


class ExportFailed(ExportError):
    """Neither ONNX exporter (nor torch.export, nor TorchScript) could turn the network into a graph."""
