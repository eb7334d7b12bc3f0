"""Entry point: ``python -m kiln.trainer.export [--spec /etc/kiln/exportjob.json]``.

Reads the ResolvedExportJob, exports, and turns the outcome into an exit code (``kiln.api.contract.ExitCode``),
a termination message (the compact ExportReport) and ``export-report.json`` next to the artifacts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from kiln.api import contract
from kiln.api.contract import Env, ExitCode, ExportReport
from kiln.api.export_resolve import ResolvedExportJob
from kiln.api.status import Reason
from kiln.storage import StorageError, open_store
from kiln.trainer.errors import InvalidInput, one_line
from kiln.trainer.export.failures import ExportError

log = logging.getLogger("kiln.trainer.export")


def load_spec(path: Path) -> ResolvedExportJob:
    try:
        return ResolvedExportJob.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise InvalidInput(f"--spec {path}: {exc.strerror}") from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidInput(f"--spec {path}: not a ResolvedExportJob: {where}: {error['msg']}") from exc


def failure_report(exc: Exception) -> ExportReport:
    if isinstance(exc, ExportError):
        return ExportReport.failure(one_line(exc), exc.exit_code, exc.reason)
    if isinstance(exc, InvalidInput):
        return ExportReport.failure(one_line(exc), ExitCode.INVALID, Reason.INVALID_SPEC)
    return ExportReport.failure(one_line(exc), ExitCode.FAILED, Reason.EXPORT_FAILED)


def save_report(report: ExportReport, job: ResolvedExportJob | None) -> ExportReport:
    """The full report next to the artifacts (best effort: an unwritable output is logged, not fatal)."""
    if job is None:
        return report
    try:
        store = open_store(job.output_uri, job.spec.storage)
        report = report.model_copy(update={"report_uri": store.url(contract.EXPORT_REPORT_FILE)})
        store.write_bytes(contract.EXPORT_REPORT_FILE, report.model_dump_json(by_alias=True, indent=1).encode())
    except StorageError as exc:
        log.warning("cannot write %s: %s", contract.EXPORT_REPORT_FILE, exc)
    return report


def write_termination_log(path: str, text: str) -> None:
    """Best effort: a missing or read-only termination log (laptops, tests) is skipped. One process writes it,
    so unlike the trainer's there is no earlier rank's failure to keep."""
    try:
        Path(path).write_text(text)
    except OSError as exc:
        log.debug("termination log %s not written: %s", path, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kiln.trainer.export", description=__doc__)
    parser.add_argument("--spec", type=Path, default=Path(contract.SPEC_DIR) / contract.EXPORT_SPEC_FILE,
                        help="ResolvedExportJob as JSON")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,  # onnxscript and onnxruntime's quantizer narrate every pass at INFO
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout if os.environ.get(Env.LOG_STREAM) == "stdout" else sys.stderr,
    )
    logging.getLogger("kiln").setLevel(logging.INFO)
    job: ResolvedExportJob | None = None
    try:
        from kiln.trainer.export.pipeline import run_export

        job = load_spec(args.spec)
        with tempfile.TemporaryDirectory(prefix="kiln-export-") as workdir:
            report = run_export(job, Path(workdir))
    except Exception as exc:
        report = failure_report(exc)
        expected = isinstance(exc, ExportError | InvalidInput)
        log.error("export failed: %s", report.reason, exc_info=not expected)
    report = save_report(report, job)
    if report.condition_reason == Reason.VERIFICATION_FAILED:
        log.error("verification failed: %s", report.reason)
    write_termination_log(os.environ.get(Env.TERMINATION_LOG, contract.TERMINATION_LOG), report.to_json())
    log.info("export %s: %d artifact(s) under %s", report.state, len(report.artifacts), job.output_uri if job else "-")
    return int(report.exit_code if report.exit_code is not None else ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
