"""The alert rules with the real promtool: the file checks, every alert has a unit test that fires it, and the unit
tests would catch an alert that never fires."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from kiln.testing.tools import tool_path

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "helm/kiln/files/prometheus-rules.yaml"
UNIT_TESTS = Path(__file__).with_name("rules-test.yaml")


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    command = [str(tool_path("promtool")), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def alerts(rules: dict) -> dict[str, dict]:
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule}


def test_promtool_checks_the_rule_file() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_the_shipped_alerts_are_the_ones_asked_for() -> None:
    assert set(alerts(yaml.safe_load(RULES.read_text()))) == {
        "KilnTrainingJobFailed", "KilnTrainingJobRestartsClimbing", "KilnTrainingJobCannotStart",
        "KilnTrainingProgressStalled",
        "KilnCheckpointTooOld", "KilnDataWaitDominatesStepTime", "KilnOperatorReconcileErrors",
    }  # fmt: skip


def test_every_alert_fires_in_a_promtool_unit_test() -> None:
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert fired == set(alerts(yaml.safe_load(RULES.read_text())))
    result = promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", sorted(alerts(yaml.safe_load(RULES.read_text()))))
def test_the_unit_tests_fail_when_an_alert_never_fires(tmp_path: Path, alert: str) -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts(rules)[alert]["expr"] = "vector(1) == 0"  # a broken rule: never true
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    unit_tests = yaml.safe_load(UNIT_TESTS.read_text())
    unit_tests["rule_files"] = ["rules.yaml"]
    (tmp_path / "rules-test.yaml").write_text(yaml.safe_dump(unit_tests))
    result = promtool("test", "rules", "rules-test.yaml", cwd=tmp_path)
    assert result.returncode != 0 and alert in result.stdout + result.stderr, result.stdout + result.stderr
