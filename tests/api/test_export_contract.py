"""The exporter's contract, torch-free: the ExportReport (termination message and full file), its parser, and
resolving an ExportJob's source and output before the exporter runs."""

from __future__ import annotations

import json

import pytest

from kiln.api.contract import REPORT_LIMIT, ExitCode, ExportReport, parse_export_report
from kiln.api.export import ExportJobSpec
from kiln.api.export_resolve import ResolvedExportJob, resolve_export, source_run_uri
from kiln.api.status import Artifact, LatencyMs, Reason

SIZES = [str(size) for size in (1, 2, 4, 8, 16, 32, 64, 128)]


def big_artifact(fmt: str, quantization: str = "none") -> Artifact:
    return Artifact.model_validate({
        "format": fmt, "quantization": quantization, "uri": "s3://bucket/" + "x" * 200 + f"/model.{fmt}",
        "sizeBytes": 1234, "sha256": "a" * 64, "modelCardUri": "s3://bucket/" + "y" * 200, "verified": True,
        "maxAbsDiff": 1e-6, "latencyMs": {s: {"p50": 1.5, "p95": 2.5} for s in SIZES},
        "throughput": dict.fromkeys(SIZES, 1000.0), "speedup": dict.fromkeys(SIZES, 1.25),
        "fp32Speedup": dict.fromkeys(SIZES, 0.5), "recommended": False, "notRecommendedReason": "slow " * 100,
        "exporter": "legacy", "fallbackReason": "why " * 250,
    })  # fmt: skip


def test_a_long_report_fits_the_termination_message_dropping_benchmark_detail_first() -> None:
    report = ExportReport(
        state="completed", condition_reason=Reason.EXPORTED, exit_code=ExitCode.OK, source_checkpoint="s3://bucket/c",
        reference_latency_ms={s: LatencyMs(p50=2.0, p95=3.0) for s in SIZES},
        artifacts=[big_artifact("onnx"), big_artifact("onnx", "static"), big_artifact("pt2"), big_artifact("pt2")],
    )  # fmt: skip
    assert len(json.dumps(report.to_dict())) > REPORT_LIMIT  # the test needs a report that does not fit as is
    text = report.to_json()
    assert len(text.encode()) <= REPORT_LIMIT
    parsed = parse_export_report(text)
    assert parsed is not None and len(parsed.artifacts) == 4
    for artifact in parsed.artifacts:  # what status needs survives: identity, verdicts, ratios
        assert (
            artifact.sha256 == "a" * 64 and artifact.verified is True and artifact.speedup == dict.fromkeys(SIZES, 1.25)
        )
        assert artifact.throughput == {} and artifact.recommended is False


def test_a_short_report_is_kept_whole() -> None:
    report = ExportReport(state="completed", artifacts=[big_artifact("onnx").model_copy(update={"fallback_reason": None,
                          "not_recommended_reason": None})])  # fmt: skip
    assert parse_export_report(report.to_json()) == report


def test_failures_are_one_line() -> None:
    report = ExportReport.failure(
        "checkpoint\n  s3://bucket/x\tdoes not exist", ExitCode.INVALID, Reason.SOURCE_NOT_FOUND
    )
    assert report.reason == "checkpoint s3://bucket/x does not exist"
    assert parse_export_report(report.to_json()) == report


@pytest.mark.parametrize("text", [None, "", "not json", "[1]", '{"state": "exploded"}'])
def test_what_is_not_a_report_parses_to_none(text: str | None) -> None:
    assert parse_export_report(text) is None


def test_a_newer_exporters_extra_keys_are_tolerated() -> None:
    report = parse_export_report('{"state": "failed", "reason": "r", "exitCode": 3, "conditionReason": '
                                 '"VerificationFailed", "somethingNew": 1}')  # fmt: skip
    assert report is not None and report.exit_code == ExitCode.VERIFICATION_FAILED
    assert report.condition_reason == Reason.VERIFICATION_FAILED


@pytest.mark.parametrize(
    ("checkpoint", "run"),
    [
        ("s3://bucket/runs/ns/tj/checkpoints/step-000000012/state.pt", "s3://bucket/runs/ns/tj"),
        ("/data/runs/tj/checkpoints", "/data/runs/tj"),
        ("s3://bucket/elsewhere/model.pt", "s3://bucket/elsewhere"),
        ("/ckpts/step-000000004/", "/ckpts"),
    ],
)
def test_the_source_run_is_read_off_kilns_checkpoint_layout(checkpoint: str, run: str) -> None:
    assert source_run_uri(checkpoint) == run


def test_resolving_pins_the_checkpoint_and_the_output() -> None:
    spec = ExportJobSpec.model_validate({"source": {"trainingJob": "tj", "checkpoint": "latest"}})
    uri = "s3://bucket/runs/ns/tj/checkpoints/step-000000012/state.pt"
    resolved = resolve_export("ex", "ns", spec, checkpoint_uri=uri)
    assert resolved.checkpoint_uri == uri and resolved.source_training_job == "tj"
    assert resolved.output_uri == "s3://bucket/runs/ns/tj/export/ex" and resolved.spec.source.checkpoint == "latest"
    assert ResolvedExportJob.model_validate_json(resolved.model_dump_json(by_alias=True)) == resolved
    explicit = resolve_export("ex", "ns", spec, checkpoint_uri=uri, run_uri="s3://other-bucket/run")
    assert explicit.output_uri == "s3://other-bucket/run/export/ex"
    with pytest.raises(ValueError, match="must be resolved"):
        resolve_export("ex", "ns", spec)


def test_even_the_largest_report_status_allows_fits() -> None:
    huge = big_artifact("onnx").model_copy(update={"uri": "s3://bucket/" + "z" * 2000})
    report = ExportReport(state="failed", reason="r" * 5000, report_uri="s3://bucket/export-report.json",
                          artifacts=[huge] * 8)  # fmt: skip
    parsed = parse_export_report(report.to_json())
    assert len(report.to_json().encode()) <= REPORT_LIMIT
    assert parsed is not None and parsed.report_uri == "s3://bucket/export-report.json" and parsed.state == "failed"
