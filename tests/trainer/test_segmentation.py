"""The segmentation task on the shared engine: data layouts, masks, losses, metrics, weights and whole runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import CPU, run_main, summary
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score, jaccard_score
from trainer_testkit import make_job, merge, metrics_records, run_trainer, trainer_env, write_spec

from kiln.api.base import MAX_MAP
from kiln.api.contract import ExitCode
from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.augment import eval_pipeline, train_pipeline
from kiln.trainer.errors import InvalidInput
from kiln.trainer.metrics import SegmentationMetrics, segmentation_from_confusion
from kiln.trainer.shapes import write_shapes
from kiln.trainer.tasks.base import TaskData
from kiln.trainer.tasks.segmentation import LOSSES, SegmentationEvaluator, SegmentationTask
from kiln.trainer.trainer import Trainer, status_metrics

FOLDER = {"format": "segmentation-folder"}
# A network small enough to train in seconds on a CPU core (3 M parameters).
TINY = {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4}


def seg_job(tmp_path: Path, dataset: Path, /, **overrides: Any) -> ResolvedTrainingJob:
    base: dict[str, Any] = {
        "task": "segmentation",
        "model": TINY,
        "data": {"train": FOLDER, "val": FOLDER, "imageSize": 32},
        "optimizer": {"name": "adamw", "lr": 0.01},
    }
    return make_job(tmp_path, dataset, **merge(base, overrides))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), splits={"train": 128, "val": 32, "test": 16}, size=32)


def copy_split(source: Path, dest: Path) -> Path:
    for kind in ("images", "masks"):
        (dest / kind).mkdir(parents=True)
        for path in sorted((source / kind).iterdir())[:8]:
            (dest / kind / path.name).write_bytes(path.read_bytes())
    return dest


@pytest.fixture
def small(tmp_path: Path, shapes: Path) -> Path:
    """A writable copy of 8 train and 8 val pairs, for tests that break it."""
    root = tmp_path / "small"
    copy_split(shapes / "train", root / "train")
    copy_split(shapes / "val", root / "val")
    return root


def load(job: ResolvedTrainingJob) -> TaskData:
    data = job.spec.data
    roots = {"train": Path(data.train.uri), **({"val": Path(data.val.uri)} if data.val else {})}
    return SegmentationTask().load_data(job, roots)


def first_error(job: ResolvedTrainingJob) -> str:
    data = load(job)
    with pytest.raises(InvalidInput) as error:
        for split in data.splits.values():
            dataset = split.dataset(eval_pipeline(32, (0.5,) * 3, (0.5,) * 3))
            for index in range(len(split)):
                dataset[index]
    return str(error.value)


# -- data ------------------------------------------------------------------------------------------------------


def test_folder_and_csv_layouts_read_the_same_pairs(tmp_path: Path, small: Path) -> None:
    rows = [["image", "mask"]] + [
        [f"images/{p.name}", f"masks/{p.name}"] for p in sorted((small / "train/images").iterdir())
    ]
    with (small / "train" / "pairs.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    folder = load(seg_job(tmp_path, small)).splits["train"]
    table = load(seg_job(tmp_path, small, data={"train": {"uri": str(small / "train/pairs.csv"), "format": "csv"}}))
    assert len(folder) == len(table.splits["train"]) == 8
    assert [folder.describe(i) for i in range(8)] == [table.splits["train"].describe(i) for i in range(8)]
    item = folder.dataset(eval_pipeline(32, (0.5,) * 3, (0.5,) * 3))[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32) and item["mask"].dtype == torch.int64
    assert item["size"].tolist() == [32, 32]


def test_val_split_holds_out_pairs(tmp_path: Path, small: Path) -> None:
    data = load(seg_job(tmp_path, small, data={"val": None, "valSplit": 0.25}))
    assert (len(data.splits["train"]), len(data.splits["val"])) == (6, 2)
    assert data.splits["val"].prediction_key(0).startswith("predictions-val/")  # type: ignore[attr-defined]


def test_nearest_resize_keeps_only_valid_indices_and_moves_the_mask_with_the_image() -> None:
    mask = np.zeros((50, 70), np.uint8)
    mask[:, :35], mask[10:20, 40:60], mask[45:, :] = 1, 2, 255
    image = np.repeat((mask * 0 + np.arange(70, dtype=np.uint8)[None, :] * 3)[..., None], 3, axis=2)
    heavy = train_pipeline(_preset("heavy"), 33, (0,) * 3, (1,) * 3)
    for _ in range(20):  # random crops, affine warps, cutout: the mask is resized nearest-neighbour throughout
        out = heavy(image=image, mask=mask)
        assert set(np.unique(out["mask"].numpy())) <= {0, 1, 2, 255}
        assert out["mask"].shape == (33, 33)
    flipped = train_pipeline(_preset("light"), 70, (0,) * 3, (1,) * 3)
    for _ in range(10):  # HorizontalFlip moves both or neither
        out = flipped(image=image, mask=mask)
        column = out["image"][0, 0].numpy()
        assert (column[0] > column[-1]) == (out["mask"][0, 0] == 0)


def _preset(name: str) -> Any:
    from kiln.api.training import AugmentationSpec

    return AugmentationSpec(preset=name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("missing", "has no mask (expected"),
        ("size", "is 16x16 but image"),
        ("index", "holds class index 7: classes are 0..3"),
        ("rgb", "is RGB: a mask must be a single-channel image"),
    ],
)
def test_bad_pairs_name_the_file(tmp_path: Path, small: Path, breakage: str, reason: str) -> None:
    mask = small / "train" / "masks" / "0003.png"
    if breakage == "missing":
        mask.unlink()
    elif breakage == "size":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    elif breakage == "index":
        Image.fromarray(np.full((32, 32), 7, np.uint8)).save(mask)
    else:
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mask)
    job = seg_job(tmp_path, small)
    if breakage == "missing":  # found while listing the split
        with pytest.raises(InvalidInput) as error:
            load(job)
        message = str(error.value)
    else:  # found when the pair is decoded
        message = first_error(job)
    assert reason in message and "0003.png" in message and "\n" not in message


def test_the_ignore_index_is_a_valid_mask_value(tmp_path: Path, small: Path) -> None:
    values = np.asarray(Image.open(small / "train/masks/0003.png")).copy()
    values[:4] = 255
    Image.fromarray(values).save(small / "train/masks/0003.png")
    first_error_free = load(seg_job(tmp_path, small)).splits["train"].dataset(eval_pipeline(32, (0.5,) * 3, (0.5,) * 3))
    assert (first_error_free[3]["mask"][:4] == 255).all()
    assert "holds class index 255" in first_error(seg_job(tmp_path, small, data={"ignoreIndex": 200}))


def test_bad_data_ends_the_run_with_exit_2_and_one_line(isolated: Path, small: Path) -> None:
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(small / "val/masks/0001.png")
    code, message = run_main(isolated, seg_job(isolated, small, epochs=1))
    assert code == ExitCode.INVALID and message["exitCode"] == ExitCode.INVALID
    assert "0001.png holds class index 9" in message["reason"]


# -- losses and metrics ----------------------------------------------------------------------------------------


def loss_inputs(classes: int, ignore: int = 255) -> tuple[torch.Tensor, dict[str, Any]]:
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(2, classes, 16, 16, generator=generator, requires_grad=True)
    mask = torch.randint(0, max(classes, 2), (2, 16, 16), generator=generator)
    mask[:, :3] = ignore
    return logits, {"mask": mask}


@pytest.mark.parametrize("classes", [1, 4])
@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_is_finite_and_leaves_ignored_pixels_out(
    tmp_path: Path, small: Path, name: str, classes: int
) -> None:
    job = seg_job(tmp_path, small, model={"numClasses": classes}, loss={"name": name})
    data = TaskData(splits={}, num_classes=classes)
    if name == "bce" and classes > 1:
        with pytest.raises(InvalidInput, match=r"bce needs model\.numClasses 1"):
            LOSSES.get(name).build(job, data)
        return
    loss = LOSSES.get(name).build(job, data)
    logits, batch = loss_inputs(classes)
    value = loss(logits, batch)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[:, :, :3].abs().sum() == 0  # ignored pixels get no gradient
    changed = logits.detach().clone()
    changed[:, :, :3] = 50.0
    assert torch.isclose(loss(changed, batch), value.detach(), atol=1e-5)


def test_class_weights_reach_cross_entropy_and_dice(tmp_path: Path, small: Path) -> None:
    data = TaskData(splits={}, num_classes=4)
    logits, batch = loss_inputs(4)
    for name in ("cross_entropy", "dice"):
        plain = LOSSES.get(name).build(seg_job(tmp_path, small, loss={"name": name}), data)
        weighted = seg_job(tmp_path, small, loss={"name": name, "classWeights": [1.0, 0.0, 0.0, 5.0]})
        assert not torch.isclose(LOSSES.get(name).build(weighted, data)(logits, batch), plain(logits, batch)), name
    with pytest.raises(InvalidInput, match=r"lovasz takes no class weights"):
        LOSSES.get("lovasz").build(seg_job(tmp_path, small, loss={"name": "lovasz", "classWeights": [1.0] * 4}), data)


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn_over_shards(seed: int) -> None:
    rng = np.random.default_rng(seed)
    classes = 5
    target = rng.integers(0, classes - 1, size=(6, 12, 12))  # class 4 never occurs in the truth
    predicted = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, classes, size=target.shape))
    target[:, :2] = 255
    metrics = SegmentationMetrics(classes, 255, torch.device("cpu"))
    for shard in (slice(0, 2), slice(2, 6)):  # what two ranks count; their sum is what all_reduce makes
        part = SegmentationMetrics(classes, 255, torch.device("cpu"))
        part.update(torch.from_numpy(predicted[shard]), torch.from_numpy(target[shard]), 0.0)
        metrics.confusion += part.confusion
    got = metrics.compute()
    keep = target != 255
    y_true, y_pred = target[keep], predicted[keep]
    assert got["miou"] == pytest.approx(jaccard_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert got["dice"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    per_class = jaccard_score(y_true, y_pred, average=None, labels=range(classes), zero_division=0)
    for k in range(classes):
        assert got[f"iou/{k}"] == pytest.approx(per_class[k], abs=1e-6)


def test_evaluator_names_what_it_computes(tmp_path: Path, small: Path) -> None:
    for classes in (1, 4):
        job = seg_job(tmp_path, small, model={"numClasses": classes})
        evaluator = SegmentationEvaluator(job, TaskData(splits={}, num_classes=classes), torch.device("cpu"))
        logits, batch = loss_inputs(classes)
        evaluator.update(logits.detach(), batch, torch.tensor(0.5))
        assert set(evaluator.compute()) == set(evaluator.metric_names)
    assert segmentation_from_confusion(torch.tensor([[3.0, 1.0], [0.0, 0.0]]))["miou"] == pytest.approx(0.75 / 2)


def test_many_classes_keep_the_status_within_its_bounds() -> None:
    metrics = {"train/loss": 1.0, "val/miou": 0.5, "val/loss": 0.7, **{f"val/iou/{k}": 0.1 for k in range(150)}}
    kept = status_metrics(metrics, "val/miou")
    assert len(kept) == MAX_MAP and {"train/loss", "val/miou", "val/loss"} <= set(kept)
    assert status_metrics({"val/miou": 0.5}, "val/miou") == {"val/miou": 0.5}


# -- networks and weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ({"architecture": "unet3"}, "unknown model.architecture"),
        ({"encoder": "resnet343"}, "unknown model.encoder"),
        ({"encoder": "tu-resnet1000"}, "unknown model.encoder timm model"),
    ],
)
def test_unknown_names_are_invalid_input(tmp_path: Path, small: Path, model: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        Trainer(seg_job(tmp_path, small, model=model), CPU)


def test_image_size_must_fit_the_output_stride(tmp_path: Path, small: Path) -> None:
    with pytest.raises(InvalidInput, match=r"data\.imageSize: linknet .* needs a multiple of 32, not 40"):
        Trainer(seg_job(tmp_path, small, model={"architecture": "linknet"}, data={"imageSize": 40}), CPU)
    Trainer(seg_job(tmp_path, small, data={"imageSize": 40}), CPU)  # smp's unet pads any size itself


@pytest.mark.parametrize("part", ["whole", "encoder"])
def test_pretrained_loads_a_whole_network_or_an_encoder(tmp_path: Path, small: Path, part: str) -> None:
    source = Trainer(seg_job(tmp_path, small, model={"architecture": "UNet"}), CPU).c.model
    state = source.state_dict() if part == "whole" else source.encoder.state_dict()  # type: ignore[union-attr]
    torch.save({"model": state} if part == "whole" else state, tmp_path / "weights.pt")
    loaded = Trainer(seg_job(tmp_path, small, model={"pretrained": str(tmp_path / "weights.pt")}), CPU).c.model
    for key, value in loaded.state_dict().items():
        if part == "whole" or key.startswith("encoder."):
            assert torch.equal(value, source.state_dict()[key]), key


# -- runs --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_learns_the_shapes(isolated: Path, shapes: Path) -> None:
    test = {"uri": str(shapes / "test"), **FOLDER}
    job = seg_job(isolated, shapes, epochs=12, optimizer={"lr": 0.003}, data={"batchSize": 8, "test": test})
    code, message = run_main(isolated, job)
    assert code == 0, message
    records = metrics_records(Path(job.run_uri))
    assert {"train/loss/dice", "train/loss/cross_entropy", "val/miou", "val/iou/3", "val/pixel_accuracy"} <= set(
        records[-1]
    )
    result = summary(job)["evaluation"]
    # Predicting the background everywhere scores about 0.2; telling circles, squares and triangles apart at
    # 32 px from 128 images takes longer than a test should, so "sane" is clearly above that, not near 1.
    assert max(r["val/miou"] for r in records) > 0.28, records
    assert result["split"] == "test" and result["metrics"]["miou"] > 0.22, result
    assert result["metrics"]["iou/0"] > 0.8, result
    rows = list(csv.DictReader((Path(job.run_uri) / "predictions-test.csv").open()))
    assert len(rows) == 16 and set(rows[0]) == {"image", "mask", "prediction", "miou", "pixel_accuracy"}
    png = np.asarray(Image.open(Path(job.run_uri) / rows[0]["prediction"]))
    assert png.shape == (32, 32) and set(np.unique(png)) <= {0, 1, 2, 3}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_validate_test_and_predict(tmp_path: Path, shapes: Path) -> None:
    job = seg_job(
        tmp_path, shapes, epochs=2, resources={"procsPerNode": 2}, ema={"enabled": True, "decay": 0.5},
        data={"batchSize": 4, "test": {"uri": str(shapes / "test"), **FOLDER}}, gradAccumulation=2,
        loss={"weights": {"dice": 0.5, "focal": 0.5}},
    )  # fmt: skip
    result = run_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path), procs=2, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    run = Path(job.run_uri)
    assert [r["epoch"] for r in metrics_records(run)] == [1, 2]
    assert {"train/loss/dice", "train/loss/focal", "val/miou"} <= set(metrics_records(run)[-1])
    evaluation = json.loads((run / "summary.json").read_text())["evaluation"]
    assert evaluation["split"] == "test"
    rows = list(csv.DictReader((run / "predictions-test.csv").open()))
    assert len(rows) == 16 and len(list((run / "predictions-test").glob("*.png"))) == 16  # no padded duplicates
    # The all-reduced metrics equal what the written masks give over the whole split: at imageSize 32 the
    # evaluated and the original resolution are the same.
    y_true = np.concatenate([np.asarray(Image.open(shapes / "test" / r["mask"])).ravel() for r in rows])
    y_pred = np.concatenate([np.asarray(Image.open(run / r["prediction"])).ravel() for r in rows])
    metrics = evaluation["metrics"]
    assert metrics["miou"] == pytest.approx(jaccard_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert metrics["pixel_accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
