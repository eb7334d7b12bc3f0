"""The segmentation task on the shared engine: data layouts, masks, losses, metrics, weights and whole runs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inprocess import CPU, run_main, summary
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, jaccard_score
from trainer_testkit import (
    assert_evaluate_reproduces,
    assert_per_class_matches_scikit_learn,
    make_job,
    merge,
    metrics_records,
    run_trainer,
    trainer_env,
    write_spec,
)

from kiln.api.base import MAX_MAP
from kiln.api.contract import ExitCode
from kiln.api.resolve import ResolvedTrainingJob
from kiln.trainer.augment import eval_pipeline, train_pipeline
from kiln.trainer.errors import InvalidInput
from kiln.trainer.metrics import SegmentationMetrics, segmentation_from_confusion
from kiln.trainer.shapes import write_shapes
from kiln.trainer.tasks.base import TaskData
from kiln.trainer.tasks.segmentation import LOSSES, SAMPLE_IMAGES, SegmentationEvaluator, SegmentationTask
from kiln.trainer.tasks.segmentation_data import read_split
from kiln.trainer.tasks.segmentation_overlay import IGNORE_COLOUR, class_colours
from kiln.trainer.trainer import Trainer, status_metrics

FOLDER = {"format": "segmentation-folder"}
# A network small enough to train in seconds on a CPU core (3 M parameters).
TINY = {"architecture": "unet", "encoder": "tu-tf_mobilenetv3_small_minimal_100", "numClasses": 4}
# predictions-<split>.csv for TINY's 4 classes (named 0..3): per image, its mIoU and each class's IoU.
CSV_COLUMNS = {"image", "mask", "prediction", "miou", "pixel_accuracy", *(f"iou/{k}" for k in range(4))}


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
    from kiln.api.data import AugmentationSpec

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
# presence reads the auxiliary head's logits, not the masks': test_segmentation_model.py tests it.
@pytest.mark.parametrize("name", [name for name in LOSSES.names() if name != "presence"])
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


def test_class_colours_are_distinct_and_never_the_ignore_colour() -> None:
    colours = [tuple(c) for c in class_colours(65536).tolist()]
    assert len(set(colours)) == 65536 and IGNORE_COLOUR not in colours
    assert colours[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]  # PASCAL VOC's first classes


def test_predictions_and_overlays_keep_the_images_own_size(tmp_path: Path, small: Path) -> None:
    # A 20x12 image evaluated at 8x8: the class scores are resized (bilinear) to 12x20 and then decided, so the
    # predicted mask has the image's size and holds class indices only.
    root = tmp_path / "odd"
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    truth = rng.integers(0, 4, (12, 20)).astype(np.uint8)
    truth[:2] = 255
    for kind, array in (("images", image), ("masks", truth)):
        (root / kind).mkdir(parents=True)
        Image.fromarray(array).save(root / kind / "a.png")
    split = read_split("segmentation-folder", root, "val", labels=4, ignore_index=255)
    job = seg_job(tmp_path, small)
    evaluator = SegmentationEvaluator(job, TaskData(splits={}, num_classes=4), torch.device("cpu"))
    logits = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    logits[:, 3] -= 10  # class 3 is never predicted
    evaluated = torch.randint(0, 3, (1, 8, 8), generator=torch.Generator().manual_seed(1))
    [row] = evaluator.prediction_rows(logits, {"index": torch.tensor([0]), "size": torch.tensor([[12, 20]]),
                                               "mask": evaluated}, split)  # fmt: skip
    run = Path(job.run_uri)
    predicted = np.asarray(Image.open(run / row["prediction"]))
    expected = F.interpolate(logits, size=(12, 20), mode="bilinear", align_corners=False).argmax(1)[0].numpy()
    assert predicted.shape == (12, 20) and (predicted == expected).all()
    # Per image, at the evaluated size: IoU per class, empty for class 3 (in neither truth nor prediction).
    y_true, y_pred = evaluated.ravel().numpy(), logits.argmax(1).ravel().numpy()
    per_class = jaccard_score(y_true, y_pred, labels=range(3), average=None, zero_division=0)
    assert [row[f"iou/{k}"] for k in range(3)] == [round(v, 6) for v in per_class] and row["iou/3"] == ""
    assert row["miou"] == round(jaccard_score(y_true, y_pred, average="macro"), 6)
    overlay = np.asarray(Image.open(run / "samples/val/a.png"))
    colours = class_colours(4)
    assert overlay.shape == (12, 3 * 20, 3)
    assert (overlay[:, :20] == image).all() and (overlay[:, 40:] == colours[predicted]).all()
    truth_panel, ignored = overlay[:, 20:40], truth == 255
    assert (truth_panel[ignored] == IGNORE_COLOUR).all() and (truth_panel[~ignored] == colours[truth[~ignored]]).all()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_evaluation_json_predictions_and_overlays_of_a_tiny_run(isolated: Path, shapes: Path, small: Path) -> None:
    copy_split(shapes / "test", small / "test")
    for path in sorted((small / "val/masks").iterdir())[:3]:  # some ignored pixels
        values = np.asarray(Image.open(path)).copy()
        values[:3] = 255
        Image.fromarray(values).save(path)
    test = {"uri": str(small / "test"), **FOLDER}
    job = seg_job(isolated, small, epochs=1, data={"batchSize": 4, "test": test})
    code, message = run_main(isolated, job)
    assert code == 0, message
    run, colours = Path(job.run_uri), class_colours(4)
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert set(evaluation) == {"val", "test"} and summary(job)["evaluation"]["metrics"] == evaluation["test"]["metrics"]
    for split, report in evaluation.items():
        rows = list(csv.DictReader((run / f"predictions-{split}.csv").open()))
        assert set(rows[0]) == CSV_COLUMNS
        assert len(rows) == report["images"] == 8 and report["ignoreIndex"] == 255
        # At imageSize 32 the evaluated and the original resolution are the same: the written masks give the
        # split's numbers exactly.
        truths = [np.asarray(Image.open(small / split / r["mask"])) for r in rows]
        predictions = [np.asarray(Image.open(run / r["prediction"])) for r in rows]
        truth, predicted = np.stack(truths), np.stack(predictions)
        keep = truth != 255
        y_true, y_pred = truth[keep], predicted[keep]
        assert report["confusion"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
        assert report["metrics"]["miou"] == pytest.approx(jaccard_score(y_true, y_pred, average="macro"), abs=1e-6)
        assert [c["name"] for c in report["classes"]] == ["0", "1", "2", "3"]
        assert_per_class_matches_scikit_learn(report["classes"], y_true, y_pred, 4)
        for row, one_truth, one_predicted in zip(rows[:SAMPLE_IMAGES], truths, predictions, strict=False):
            overlay = np.asarray(Image.open(run / "samples" / split / Path(row["image"]).name))
            assert overlay.shape == (32, 3 * 32, 3)
            assert (overlay[:, 64:] == colours[one_predicted]).all()
            ignored = one_truth == 255
            assert (overlay[:, 32:64][ignored] == IGNORE_COLOUR).all()
            assert (overlay[:, 32:64][~ignored] == colours[one_truth[~ignored]]).all()
    # `kiln evaluate` of the run's checkpoint on its test data: the same numbers, predictions and overlays.
    out = isolated / "evaluated"
    assert assert_evaluate_reproduces(job, "test", out)["confusion"] == evaluation["test"]["confusion"]
    assert len(list(csv.DictReader((out / "predictions-test.csv").open()))) == 8
    assert len(list((out / "samples" / "test").glob("*.png"))) == SAMPLE_IMAGES


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
    assert len(rows) == 16 and set(rows[0]) == CSV_COLUMNS
    png = np.asarray(Image.open(Path(job.run_uri) / rows[0]["prediction"]))
    assert png.shape == (32, 32) and set(np.unique(png)) <= {0, 1, 2, 3}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_train_validate_test_and_predict(tmp_path: Path, shapes: Path) -> None:
    job = seg_job(
        tmp_path, shapes, epochs=2, resources={"procsPerNode": 2}, ema={"enabled": True, "decay": 0.5},
        data={"batchSize": 4, "test": {"uri": str(shapes / "test"), **FOLDER}}, gradAccumulation=2,
        loss={"weights": {"dice": 0.5, "focal": 0.5}, "classWeights": "auto"},
    )  # fmt: skip
    result = run_trainer(write_spec(job, tmp_path / "spec.json"), trainer_env(tmp_path), procs=2, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    run = Path(job.run_uri)
    # Each rank counted its shard of the training masks: the all-reduced sums are the split's, as numpy counts
    # them (ranks that each read every mask would double them).
    stats = json.loads((run / "class-stats.json").read_text())
    masks = [np.asarray(Image.open(path)) for path in sorted((shapes / "train" / "masks").iterdir())]
    pixels = np.concatenate([mask.ravel() for mask in masks])
    assert [c["pixels"] for c in stats["classes"]] == np.bincount(pixels, minlength=4).tolist()
    assert [c["images"] for c in stats["classes"]] == [sum(bool((m == k).any()) for m in masks) for k in range(4)]
    assert (result.stdout + result.stderr).count("loss.classWeights auto (balanced, from pixels per class)") == 1
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
    report = json.loads((run / "evaluation.json").read_text())
    assert report["test"]["confusion"] == confusion_matrix(y_true, y_pred, labels=range(4)).tolist()
    assert report["val"]["images"] == 32 and len(list((run / "predictions-val").glob("*.png"))) == 32
    first = [f"{i:04d}.png" for i in range(SAMPLE_IMAGES)]
    for split in ("val", "test"):  # each rank draws its own share of the first images
        assert sorted(p.name for p in (run / "samples" / split).iterdir()) == first
