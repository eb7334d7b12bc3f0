"""The Argo CD health check (helm/kiln/files/argocd-health.lua), run by the real Lua 5.1 interpreter against sample
objects in Argo CD's own health_test.yaml layout, and the docs that tell users how to install it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from health_samples import TESTDATA, render, samples
from lua_harness import lua_literal, run_health_check

from kiln.api.base import GROUP
from kiln.api.export import ExportJobSpec
from kiln.api.status import Phase
from kiln.api.training import TrainingJobSpec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "helm" / "kiln" / "files" / "argocd-health.lua"
HEALTH_TEST = TESTDATA.parent / "health_test.yaml"
CASES: list[dict[str, Any]] = yaml.safe_load(HEALTH_TEST.read_text())["tests"]
KINDS = ("TrainingJob", "ExportJob")
HEALTH = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def load(input_path: str) -> dict[str, Any]:
    return yaml.safe_load((HEALTH_TEST.parent / input_path).read_text())


def test_the_samples_are_what_the_operator_writes() -> None:
    """testdata/ equals what the state machines produce today; else regenerate it (health_samples.py says how)."""
    made = samples()
    on_disk = {path.stem: path.read_text() for path in TESTDATA.glob("*.yaml")}
    assert sorted(on_disk) == sorted(made), "run .venv/bin/python tests/gitops/health_samples.py"
    stale = [name for name, document in made.items() if on_disk[name] != render(document)]
    assert not stale, f"stale samples {stale}: run .venv/bin/python tests/gitops/health_samples.py"


def test_every_sample_has_a_case_and_every_phase_is_covered() -> None:
    used = {Path(case["inputPath"]).stem for case in CASES}
    assert used == set(samples())
    phases = {(load(c["inputPath"])["kind"], load(c["inputPath"]).get("status", {}).get("phase")) for c in CASES}
    assert {phase for kind, phase in phases if kind == "TrainingJob"} >= {p.value for p in Phase}
    assert {phase for kind, phase in phases if kind == "ExportJob"} >= {"Pending", "Running", "Succeeded", "Failed"}


@pytest.mark.parametrize("case", CASES, ids=[Path(c["inputPath"]).stem for c in CASES])
def test_health_check(case: dict[str, Any]) -> None:
    [(status, message)] = run_health_check(SCRIPT, [load(case["inputPath"])])
    assert {"status": status, "message": message} == case["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_phase_has_a_health_and_an_unknown_one_is_unknown(kind: str) -> None:
    objects = [{"kind": kind, "metadata": {"generation": 1}, "status": {"phase": p.value}} for p in Phase]
    results = run_health_check(SCRIPT, [*objects, {"kind": kind, "status": {"phase": "Exploding", "conditions": []}}])
    expected = {"Succeeded": "Healthy", "Failed": "Degraded", "Suspended": "Suspended"}
    assert [status for status, _ in results[:-1]] == [expected.get(p.value, "Progressing") for p in Phase]
    assert [message for _, message in results[:-1]] == [p.value for p in Phase]  # no condition: the phase itself
    assert results[-1][0] == "Unknown" and "Exploding" in results[-1][1]
    assert {status for status, _ in results} <= HEALTH


def test_the_harness_gives_lua_the_exact_strings() -> None:
    tricky = 'naïve "quoted" back\\slash\nnew line'
    obj = {"status": {"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "reason": "R",
                                                         "message": tricky}]}}  # fmt: skip
    assert run_health_check(SCRIPT, [obj]) == [("Degraded", f"R: {tricky}")]
    assert lua_literal({"a": [1, 2.5, None, True]}) == '{["a"] = {1, 2.5, nil, true}}'


def test_a_script_outside_the_sandbox_fails(tmp_path: Path) -> None:
    """The harness hides io and os, as Argo CD does, so a check that would break there breaks here."""
    script = tmp_path / "health.lua"
    script.write_text('return {status = "Healthy", message = os.getenv("HOME")}\n')
    with pytest.raises(AssertionError, match="attempt to index global 'os'"):
        run_health_check(script, [{}])


# -- docs/operations.md, GitOps -------------------------------------------------------------------------------------


def gitops_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    match = re.search(r"^## GitOps with Argo CD\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert match, "docs/operations.md has no '## GitOps with Argo CD' section"
    return match.group(1)


def test_the_docs_install_the_shipped_script_for_both_kinds() -> None:
    section = gitops_section()
    for kind in KINDS:
        assert f"resource.customizations.health.{GROUP}_{kind}" in section
    assert "helm/kiln/files/argocd-health.lua" in section
    assert "hs.status" not in section and "local function" not in section, "link the script, do not copy it"


def immutable_fields(rules: tuple[Any, ...]) -> set[str]:
    return {rule.message.split(" is immutable")[0] for rule in rules if "oldSelf" in rule.cel}


def test_the_docs_name_every_immutable_field() -> None:
    section = gitops_section()
    fields = immutable_fields(TrainingJobSpec.__rules__)
    assert fields >= {"task", "model", "data", "resources.nodes", "checkpoint.uri", "output.uri", "image"}
    missing = sorted(field for field in fields if f"`{field}`" not in section)
    assert not missing, f"the GitOps section does not name the immutable fields {missing}"
    assert immutable_fields(ExportJobSpec.__rules__) == {"spec"}
    assert "ExportJob" in section and "immutable" in section
