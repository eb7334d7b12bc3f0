"""The csv data format end to end, and early stopping (metric, mode, patience, minDelta), in one process."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from inprocess import run_main, summary
from sklearn.metrics import confusion_matrix
from trainer_testkit import assert_per_class_matches_scikit_learn, make_job, metrics_records, write_images

from kiln.api.contract import ExitCode

pytestmark = pytest.mark.timeout(60)


def to_csv(imagefolder: Path, dest: Path, *, names: dict[str, str]) -> Path:
    """Move an imagefolder split into dest/images/ and describe it as path,label rows in dest/labels.csv."""
    rows = []
    for image in sorted(imagefolder.rglob("*.png")):
        target = dest / "images" / f"{image.parent.name}-{image.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
        rows.append([str(target.relative_to(dest)), names[image.parent.name]])
    with (dest / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return dest


def test_csv_format_trains_validates_and_names_classes(isolated: Path, tiny_data: Path) -> None:
    names = {"class0": "red", "class1": "green", "class2": "blue"}
    train = to_csv(tiny_data / "train", isolated / "csv-train", names=names)
    val = to_csv(tiny_data / "val", isolated / "csv-val", names=names)
    job = make_job(
        isolated, tiny_data, epochs=3,
        data={"train": {"uri": str(train / "labels.csv"), "format": "csv"},  # the file itself
              "val": {"uri": str(val), "format": "csv"}},  # a folder holding exactly one .csv
    )  # fmt: skip
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    result = summary(job)
    assert result["state"] == "completed" and result["evaluation"]["split"] == "val"
    assert result["evaluation"]["metrics"]["accuracy"] >= 0.9
    with (Path(job.run_uri) / "predictions-val.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 15
    assert {row["label"] for row in rows} == {"red", "green", "blue"}
    assert all(row["path"].startswith("images/") for row in rows)  # relative to the csv, as written
    # evaluation.json: per-class numbers and the confusion matrix, by class name, equal scikit-learn's on the
    # predictions file's labels.
    report = json.loads((Path(job.run_uri) / "evaluation.json").read_text())["val"]
    names = [c["name"] for c in report["classes"]]
    assert sorted(names) == ["blue", "green", "red"] and report["images"] == 15
    assert report["metrics"] == result["evaluation"]["metrics"]
    y_true = np.array([names.index(row["label"]) for row in rows])
    y_pred = np.array([names.index(row["prediction"]) for row in rows])
    assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=range(3)).tolist()
    assert_per_class_matches_scikit_learn(report["classes"], y_true, y_pred, 3)


def test_csv_row_naming_a_missing_image_is_invalid_input(isolated: Path, tiny_data: Path) -> None:
    folder = isolated / "broken"
    folder.mkdir()
    (folder / "labels.csv").write_text("path,label\nnope.png,red\n")
    job = make_job(isolated, tiny_data, epochs=1, data={"train": {"uri": str(folder), "format": "csv"}})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert "row 1: nope.png does not exist" in message["reason"]


def test_early_stopping_ends_the_run_and_says_why(isolated: Path, tiny_data: Path) -> None:
    # val/loss must drop by 10 to count as an improvement: the first validation sets the bar, the second
    # misses it, and patience 1 stops the run at epoch 2 of 20.
    job = make_job(
        isolated, tiny_data, epochs=20, earlyStopping={"metric": "val/loss", "patience": 1, "minDelta": 10.0}
    )
    assert job.spec.early_stopping is not None and job.spec.early_stopping.mode == "min"
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    assert [r["epoch"] for r in metrics_records(Path(job.run_uri))] == [1, 2]
    result = summary(job)
    assert result["state"] == "completed" and result["progress"]["epoch"] == 2
    reason = "early stopping: loss did not improve by more than 10 for 1 validation(s)"
    assert result["stopReason"].startswith(reason)
    assert message["state"] == "completed" and message["stopReason"] == result["stopReason"]
    assert result["checkpoints"]["latest"] is not None  # the last epoch is checkpointed like a final one


def test_early_stopping_with_patience_left_runs_every_epoch(isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=3, earlyStopping={"patience": 3})  # watches accuracy, max
    code, message = run_main(isolated, job)
    assert code == ExitCode.OK, message
    assert [r["epoch"] for r in metrics_records(Path(job.run_uri))] == [1, 2, 3]
    assert "stopReason" not in summary(job) and "stopReason" not in message


def test_unknown_early_stopping_metric_is_rejected_before_training(isolated: Path, tiny_data: Path) -> None:
    job = make_job(isolated, tiny_data, epochs=2, earlyStopping={"metric": "val/acuracy", "mode": "max"})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert "earlyStopping.metric" in message["reason"] and "accuracy" in message["reason"]
    assert not (Path(job.run_uri) / "metrics.jsonl").exists()


def test_early_stopping_without_validation_data_is_rejected(isolated: Path, tmp_path: Path) -> None:
    data = write_images(tmp_path / "only-train" / "train", 4, size=8).parent
    job = make_job(isolated, data, epochs=2, data={"val": None}, earlyStopping={"patience": 2})
    code, message = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert "earlyStopping" in message["reason"]


def test_raising_epochs_after_early_stopping_trains_on_with_fresh_patience(isolated: Path, tiny_data: Path) -> None:
    # val/loss never improves by 10: patience 2 stops the run at epoch 3 of 20.
    stopping = {"metric": "val/loss", "patience": 2, "minDelta": 10.0}
    code, message = run_main(isolated, make_job(isolated, tiny_data, epochs=20, earlyStopping=stopping))
    assert code == ExitCode.OK and message["progress"]["epoch"] == 3, message
    # The operator's next attempt after `epochs: 21`: it resumes from the checkpoint (which says 20 epochs and
    # stopped), trains on, and early stopping gets its full patience again (epochs 4 and 5), not one more epoch.
    raised = make_job(isolated, tiny_data, epochs=21, earlyStopping=stopping)
    code, message = run_main(isolated, raised)
    assert code == ExitCode.OK, message
    assert [r["epoch"] for r in metrics_records(Path(raised.run_uri))] == [1, 2, 3, 4, 5]
    assert message["stopReason"].endswith("stopped at epoch 5 of 21")
    # A restart with the same epochs does not train on: the stop decision stands.
    code, message = run_main(isolated, raised)
    assert code == ExitCode.OK and message["progress"]["epoch"] == 5
    assert [r["epoch"] for r in metrics_records(Path(raised.run_uri))] == [1, 2, 3, 4, 5]
