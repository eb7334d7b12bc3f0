"""Pure parts of the executor's pod translation (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

from kiln.testing.localpod import expand, rewriter
from kiln.testing.pod_status import exit_code, termination_message


def test_expand_follows_kubernetes_rules() -> None:
    env = {"INDEX": "1", "JOB": "train"}

    assert expand("--node-rank=$(INDEX)", env) == "--node-rank=1"
    assert expand("$(JOB)-0.$(MISSING)", env) == "train-0.$(MISSING)"
    assert expand("$$(INDEX) costs $$5", env) == "$(INDEX) costs $5"


def test_rewriter_maps_mounts_longest_first_and_only_at_path_boundaries() -> None:
    pod = {"metadata": {"namespace": "ml"}, "spec": {"subdomain": "svc"}}
    rewrite = rewriter(pod, {"/data": Path("/host/data"), "/data/cache": Path("/host/cache")})

    assert rewrite("--root=/data/images") == "--root=/host/data/images"
    assert rewrite("/data/cache/x") == "/host/cache/x"
    assert rewrite("/database /mnt/data") == "/database /mnt/data"
    assert rewrite("job-0.svc:29500 job-1.svc.ml.svc.cluster.local") == "127.0.0.1:29500 127.0.0.1"
    assert rewrite("job-0.svc.other") == "job-0.svc.other"


def test_termination_message_falls_back_to_the_log_tail_only_on_error() -> None:
    log = b"".join(f"line {n}\n".encode() for n in range(200))

    assert termination_message(b"done", log, policy="FallbackToLogsOnError", failed=True) == "done"
    assert termination_message(b"", log, policy="File", failed=True) == ""
    assert termination_message(b"", log, policy="FallbackToLogsOnError", failed=False) == ""
    assert termination_message(b"", log, policy="FallbackToLogsOnError", failed=True).endswith("line 199")


def test_signals_become_128_plus_n() -> None:
    assert (exit_code(-9), exit_code(-15), exit_code(3)) == (137, 143, 3)
