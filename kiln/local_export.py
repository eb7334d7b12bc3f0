"""``kiln export FILE [--checkpoint PATH_OR_URI]``: an ExportJob manifest, run on this machine as its pod would.

The manifest is validated as the apiserver would, its source resolved (``--checkpoint``, else
``source.checkpointUri``, else the checkpoints ``kiln run`` left for ``source.trainingJob`` under ``./.kiln``),
and the ResolvedExportJob handed to ``python -m kiln.trainer.export`` exactly as the pod gets it. The
exporter's log goes to ``.kiln/exports/<namespace>-<name>/export.log``; its report becomes a table of the
artifacts. Torch-free: everything torch-shaped happens in the child process.

Exit codes are the exporter's (kiln.api.contract.ExitCode): 0 exported and verified; 1 the export failed
(an S3 outage, no exporter could trace the network); 2 invalid input (the manifest, a missing checkpoint, one
of a task the exporter does not handle); 3 an artifact failed verification (it is still written).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kiln.api.contract import ExitCode, ExportReport, parse_export_report
from kiln.api.export_resolve import ResolvedExportJob, resolve_export
from kiln.api.manifest import InvalidManifest, ManifestError
from kiln.api.parse import load_export_job
from kiln.api.status import Artifact

STATE_DIR = ".kiln"
LOCAL_NAMESPACE = "local"  # kiln run's namespace for manifests that name none


@dataclass(frozen=True)
class LocalExport:
    job: ResolvedExportJob
    spec_path: Path
    run_dir: Path


def _local_checkpoints(training_job: str, namespace: str, cwd: Path) -> Path:
    """Where ``kiln run`` keeps a TrainingJob's checkpoints (its default run layout under ./.kiln)."""
    return (cwd / STATE_DIR / namespace / training_job / "checkpoints").absolute()


def prepare(manifest: Path, checkpoint: str | None, cwd: Path) -> LocalExport:
    """Validate, resolve and write the spec; InvalidManifest for any problem found before the exporter starts."""
    job = load_export_job(manifest)
    namespace = job.metadata.namespace or LOCAL_NAMESPACE
    source = job.spec.source
    uri = checkpoint or source.checkpoint_uri
    if uri is None:
        assert source.training_job is not None  # the spec's rule: exactly one of the two
        uri = str(_local_checkpoints(source.training_job, namespace, cwd))
        where = f"spec.source.trainingJob {source.training_job}: no checkpoints from `kiln run` at {uri}"
    else:
        where = f"{'--checkpoint' if checkpoint else 'spec.source.checkpointUri'}: checkpoint {uri} does not exist"
    if not uri.startswith("s3://"):
        path = Path(uri.removeprefix("file://"))
        uri = str(path if path.is_absolute() else (cwd / path).absolute())
        if not Path(uri).exists():
            raise InvalidManifest([ManifestError(str(manifest), "", where)])
    resolved = resolve_export(job.metadata.name, namespace, job.spec, checkpoint_uri=uri, uid=job.metadata.uid)
    run_dir = (cwd / STATE_DIR / "exports" / f"{namespace}-{job.metadata.name}").absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "exportjob.json"
    spec_path.write_text(resolved.model_dump_json(by_alias=True, indent=1))
    return LocalExport(resolved, spec_path, run_dir)


def run_exporter(local: LocalExport, cwd: Path) -> ExportReport | None:
    termination_log = local.run_dir / "termination-log"
    termination_log.unlink(missing_ok=True)
    env = {**os.environ, "KILN_TERMINATION_LOG": str(termination_log), "KILN_LOG_STREAM": "stdout"}
    with (local.run_dir / "export.log").open("w") as log:
        subprocess.run(
            [sys.executable, "-m", "kiln.trainer.export", "--spec", str(local.spec_path)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False,
        )  # fmt: skip
    compact = parse_export_report(termination_log.read_text()) if termination_log.exists() else None
    # The termination message is trimmed to fit Kubernetes' limit; the full report sits next to local artifacts.
    full = Path(compact.report_uri) if compact is not None and compact.report_uri else None
    if full is not None and not compact.report_uri.startswith("s3://") and full.exists():  # type: ignore[union-attr]
        return parse_export_report(full.read_text()) or compact
    return compact


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size:.1f} GiB"


def artifact_table(report: ExportReport) -> Table:
    """One row per artifact plus eager PyTorch's, the reference; latency and speedup cells list every benchmarked
    batch size, in the order the header gives, so the table keeps seven columns however many there are."""
    sizes = sorted(
        {size for a in report.artifacts for size in a.latency_ms} | set(report.reference_latency_ms), key=int
    )
    batches = "/".join(sizes) or "-"
    inputs = report.verification_inputs or "no"
    table = Table(title=f"{report.exported_weights or '?'} weights, verified on {inputs} inputs", title_justify="left")
    for column in (
        "artifact",
        "size",
        "verified",
        "max abs diff",
        f"p50 ms (batch {batches})",
        "vs eager",
        "recommended",
    ):
        table.add_column(column, justify="left" if column in ("artifact", "verified", "recommended") else "right")
    for artifact in report.artifacts:
        table.add_row(*_row(artifact, sizes))
    eager = [report.reference_latency_ms[size].p50 for size in sizes if size in report.reference_latency_ms]
    table.add_row("eager torch", "", "", "", " / ".join(f"{p50:.3f}" for p50 in eager), "1x", "", style="dim")
    return table


def _row(artifact: Artifact, sizes: list[str]) -> list[str]:
    name = artifact.format if artifact.quantization == "none" else f"{artifact.format} int8-{artifact.quantization}"
    diff = f"{artifact.max_abs_diff:.1e}" if artifact.max_abs_diff is not None else ""
    p50 = " / ".join(f"{artifact.latency_ms[size].p50:.3f}" for size in sizes if size in artifact.latency_ms)
    speedup = " / ".join(f"{artifact.speedup[size]:.2f}x" for size in sizes if size in artifact.speedup)
    flags = {True: "yes", False: "no", None: "-"}
    return [name, _size(artifact.size_bytes), flags[artifact.verified], diff, p50, speedup, flags[artifact.recommended]]


def export_manifest(manifest: Path, checkpoint: str | None, console: Console, err: Console, cwd: Path) -> int:
    try:
        local = prepare(manifest, checkpoint, cwd)
    except InvalidManifest as exc:
        for error in exc.errors:
            err.print(f"[red]error[/red] {error}", highlight=False)
        return ExitCode.INVALID
    job = local.job
    console.print(f"[bold]kiln export[/bold] {job.namespace}/{job.name}: {job.checkpoint_uri} -> {job.output_uri}",
                  highlight=False)  # fmt: skip
    report = run_exporter(local, cwd)
    log = local.run_dir / "export.log"
    if report is None:
        err.print(f"[red]error[/red] the exporter ended without a report; see {log}", highlight=False)
        return ExitCode.FAILED
    if report.artifacts:
        console.print(artifact_table(report))
        for artifact in report.artifacts:
            if artifact.not_recommended_reason:
                console.print(f"[yellow]not recommended[/yellow] {artifact.uri}: {artifact.not_recommended_reason}",
                              highlight=False)  # fmt: skip
            if artifact.fallback_reason:
                console.print(f"[yellow]legacy ONNX exporter[/yellow]: {artifact.fallback_reason}", highlight=False)
    if report.state == "failed":
        err.print(f"[red]error[/red] {report.condition_reason}: {report.reason} (log: {log})", highlight=False)
        return int(report.exit_code or ExitCode.FAILED)
    console.print(
        f"[green]ok[/green] {len(report.artifacts)} artifact(s); report: {report.report_uri}", highlight=False
    )
    return ExitCode.OK
