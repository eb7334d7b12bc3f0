"""What the operator's process loads stays resident for as long as it runs (docs/benchmarks.md, "Fewer handler
threads, no rich in the operator"): `kiln operator` is the CLI's process, so the CLI must not load what only its
other commands print with, and kopf must not load the kubernetes client it only recognises."""

import subprocess
import sys

UNWANTED = ("rich", "kubernetes")
LOADED = f"import sys, kiln.cli, kiln.operator.runner; print(sorted(m for m in {UNWANTED} if m in sys.modules))"


def test_the_operator_process_loads_neither_rich_nor_the_kubernetes_client() -> None:
    # A fresh interpreter: this one has loaded both long since (the test harness, other tests).
    out = subprocess.run([sys.executable, "-c", LOADED], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
