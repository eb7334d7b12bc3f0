"""`kiln list KIND [--task T] [PATTERN]`, checked against the committed name catalogue file itself."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kiln.cli import EXIT_FAILED, EXIT_INVALID, EXIT_OK, app

CATALOGUE: dict[str, Any] = json.loads((Path(__file__).parents[2] / "kiln/api/catalogue.json").read_text())
TASKS = sorted(CATALOGUE["tasks"])


def kiln_list(*args: str) -> tuple[int, list[str], str]:
    result = CliRunner().invoke(app, ["list", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout.splitlines(), result.stderr


def per_task(key: str, task: str) -> set[str]:
    return set(CATALOGUE["tasks"][task][key])


EXPECTED = {
    "optimizers": lambda task: set(CATALOGUE["optimizers"]),
    "schedulers": lambda task: set(CATALOGUE["schedulers"]),
    "transforms": lambda task: set(CATALOGUE["transforms"]),
    "models": lambda task: set(CATALOGUE["architectures"][task]),
    "losses": lambda task: per_task("losses", task),
    "metrics": lambda task: per_task("metrics", task),
    "encoders": lambda task: set(CATALOGUE["encoders"]) if task == "segmentation" else set(),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_kind_lists_the_catalogue_names_of_every_task(kind: str) -> None:
    code, names, _ = kiln_list(kind)
    assert code == EXIT_OK
    assert names == sorted(set().union(*(EXPECTED[kind](task) for task in TASKS)))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("kind", ["models", "losses", "metrics"])
def test_task_narrows_to_that_task(kind: str, task: str) -> None:
    code, names, _ = kiln_list(kind, "--task", task)
    assert code == EXIT_OK and names == sorted(EXPECTED[kind](task))


def test_a_pattern_is_a_case_blind_glob_or_a_part_of_the_name() -> None:
    models = CATALOGUE["architectures"]["classification"]
    _, names, _ = kiln_list("models", "--task", "classification", "RESNET1*")
    assert names == sorted(m for m in models if fnmatch.fnmatchcase(m, "resnet1*"))
    _, names, _ = kiln_list("transforms", "blur")
    assert names == sorted(t for t in CATALOGUE["transforms"] if "blur" in t.lower()) and "MotionBlur" in names


def test_encoders_of_another_task_or_no_match_exit_1() -> None:
    code, names, err = kiln_list("encoders", "--task", "classification")
    assert (code, names) == (EXIT_FAILED, []) and "no encoders match" in err
    code, _, _ = kiln_list("optimizers", "no-such-optimizer")
    assert code == EXIT_FAILED


def test_an_unknown_kind_or_task_is_invalid_input_on_one_line() -> None:
    code, _, err = kiln_list("widgets")
    assert code == EXIT_INVALID and err.strip().splitlines() == [
        "error KIND: unknown kind 'widgets'; valid: models, encoders, losses, optimizers, schedulers, metrics, "
        "transforms"
    ]
    code, _, err = kiln_list("models", "--task", "segmentaton")
    assert code == EXIT_INVALID and "--task: unknown task 'segmentaton'; did you mean segmentation?" in err
