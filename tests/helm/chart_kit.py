"""The real helm (tools/install-helm.sh) run on helm/kiln: render it, install it, read what it made."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from kiln.testing.tools import tool_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm/kiln"
# helm keeps repositories, plugins and caches under these; the tests leave the user's own alone.
_HELM_HOME = Path(tempfile.mkdtemp(prefix="kiln-helm-home-"))
atexit.register(shutil.rmtree, _HELM_HOME, ignore_errors=True)


def helm(
    *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(_HELM_HOME / "cache"),
        "HELM_CONFIG_HOME": str(_HELM_HOME / "config"),
        "HELM_DATA_HOME": str(_HELM_HOME / "data"),
    }
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    result = subprocess.run(
        [str(tool_path("helm")), *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def values_file(values: dict[str, Any], directory: Path) -> Path:
    path = Path(tempfile.mkstemp(suffix=".yaml", dir=directory)[1])
    path.write_text(yaml.safe_dump(values))
    return path


def render(
    values: dict[str, Any] | None = None, *, chart: Path = CHART, release: str = "kiln", namespace: str = "kiln-system"
) -> list[dict[str, Any]]:
    """`helm template` as parsed documents (empty documents dropped)."""
    with tempfile.TemporaryDirectory() as scratch:
        extra = ["--values", str(values_file(values, Path(scratch)))] if values else []
        output = helm("template", release, str(chart), "--namespace", namespace, *extra).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def one(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [document for document in documents if document["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def default_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values
