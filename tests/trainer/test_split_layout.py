"""Staging a split with what its layout keeps above it: yolo's data.yaml and labels/<split> come along from S3, in
both Ultralytics layouts, and the boxes read from S3 are the boxes read from the same folders on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from inprocess import run_main
from trainer_testkit import YoloLayout, make_job, upload_yolo, yolo_key, yolo_split_uri

from kiln.api.contract import ExitCode
from kiln.api.data import DataSource
from kiln.api.resolve import ResolvedTrainingJob
from kiln.testing.s3 import S3Server
from kiln.trainer.data import localize
from kiln.trainer.detection_shapes import write_detection_shapes
from kiln.trainer.distributed import World
from kiln.trainer.errors import InvalidInput
from kiln.trainer.split_layout import SplitLayout, split_layout, yolo_layout
from kiln.trainer.tasks.detection_data import DetectionSplit, read_detection_split

LAYOUTS: tuple[YoloLayout, ...] = ("split-folders", "images-folders")
ONE_PROCESS = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


TWIN_YAMLS = ("images/data.yaml", "data.yaml")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://b/ds/train/", SplitLayout("s3://b/ds", "train", (), ("data.yaml",))),
        ("s3://b/ds/images/val", SplitLayout("s3://b/ds", "images/val", ("labels/val",), TWIN_YAMLS)),
        ("s3://b/ds/v/images", SplitLayout("s3://b/ds", "v/images", ("v/labels",), ("v/data.yaml", "data.yaml"))),
        ("s3://b/images/val", SplitLayout("s3://b", "images/val", ("labels/val",), TWIN_YAMLS)),
        ("s3://b/train", SplitLayout("s3://b", "train", (), ("data.yaml",))),
        ("s3://b", SplitLayout("s3://b", "", (), ())),
    ],
)  # fmt: skip
def test_a_yolo_split_brings_its_labels_twin_and_the_data_yaml_above_it(uri: str, expected: SplitLayout) -> None:
    assert yolo_layout(uri) == expected


def test_other_formats_stage_their_prefix_alone() -> None:
    assert split_layout("s3://b/ds/images/train", "coco") == SplitLayout("s3://b/ds/images/train")


@pytest.fixture(scope="module")
def yolo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's yolo output (data.yaml above the splits) and the same images as coco, at 32 px."""
    root = tmp_path_factory.mktemp("yolo-shapes")
    return write_detection_shapes(root, splits={"train": 10, "val": 4, "test": 2}, size=32)


def rearranged(yolo: Path, dest: Path, layout: YoloLayout) -> Path:
    """The generator's yolo folders on disk in ``layout``."""
    for path in sorted(p for p in yolo.rglob("*") if p.is_file()):
        target = dest / yolo_key(path.relative_to(yolo), layout)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dest


def staging_job(tmp_path: Path, s3: S3Server) -> ResolvedTrainingJob:
    return make_job(
        tmp_path, tmp_path, task="detection", model={"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"},
        data={split: {"uri": str(tmp_path), "format": "yolo"} for split in ("train", "val")}
        | {"staging": {"cacheDir": str(tmp_path / "cache")}},
        storage={"endpointUrl": s3.endpoint_url},
    )  # fmt: skip


def read(uri: str, split: str, job: ResolvedTrainingJob) -> DetectionSplit:
    root = localize(DataSource(uri=uri, format="yolo"), split, job, ONE_PROCESS)
    return read_detection_split(root, "yolo", split=split)


def boxes_of(split: DetectionSplit) -> list[tuple[str, list[list[float]], list[int]]]:
    return [(Path(image.path.name).stem, image.boxes.tolist(), image.labels.tolist()) for image in split.images]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_yolo_from_s3_reads_as_the_same_folders_on_disk(
    tmp_path: Path, yolo: Path, s3_server: S3Server, s3_bucket: str, layout: YoloLayout
) -> None:
    job = staging_job(tmp_path, s3_server)
    remote = upload_yolo(s3_server, s3_bucket, yolo / "yolo", "shapes", layout)
    local = rearranged(yolo / "yolo", tmp_path / "local", layout)
    coco = read_detection_split(yolo / "coco" / "train", "coco", split="train")
    for split in ("train", "val"):
        from_s3 = read(yolo_split_uri(remote, split, layout), split, job)
        on_disk = read(yolo_split_uri(str(local), split, layout), split, job)
        assert from_s3.class_names == on_disk.class_names == ("circle", "square", "triangle")
        assert boxes_of(from_s3) == boxes_of(on_disk)
        assert len(from_s3) == {"train": 10, "val": 4}[split]
        assert sum(len(image.labels) for image in from_s3.images) > 0  # the labels came along, not just images
    train = read(yolo_split_uri(remote, "train", layout), "train", job)
    assert [image.labels.tolist() for image in train.images] == [image.labels.tolist() for image in coco.images]


@pytest.mark.timeout(60)
def test_a_changed_data_yaml_is_fetched_again(tmp_path: Path, yolo: Path, s3_server: S3Server, s3_bucket: str) -> None:
    job = staging_job(tmp_path, s3_server)
    remote = upload_yolo(s3_server, s3_bucket, yolo / "yolo", "shapes", "split-folders")
    assert read(f"{remote}/val", "val", job).class_names == ("circle", "square", "triangle")
    s3_server.client().put_object(Bucket=s3_bucket, Key="shapes/data.yaml", Body=b"names: [disc, box, wedge]\n")
    assert read(f"{remote}/val", "val", job).class_names == ("disc", "box", "wedge")
    s3_server.client().delete_object(Bucket=s3_bucket, Key="shapes/data.yaml")
    with pytest.raises(InvalidInput, match=r"data\.val\.uri: no data\.yaml with names"):
        read(f"{remote}/val", "val", job)


@pytest.mark.timeout(60)
def test_yolo_bad_input_from_s3_names_the_file_and_line(
    tmp_path: Path, yolo: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    job = staging_job(tmp_path, s3_server)
    remote = upload_yolo(s3_server, s3_bucket, yolo / "yolo", "shapes", "images-folders")
    label = "shapes/labels/val/0001.txt"
    s3_server.client().put_object(Bucket=s3_bucket, Key=label, Body=b"0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(
        InvalidInput, match=r"labels/val/0001\.txt line 2: class id 7 is not one of data\.yaml's names"
    ) as error:
        read(f"{remote}/images/val", "val", job)
    assert "\n" not in str(error.value)
    for obj in s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="shapes/labels/test/")["Contents"]:
        s3_server.client().delete_object(Bucket=s3_bucket, Key=obj["Key"])
    with pytest.raises(InvalidInput) as missing:
        read(f"{remote}/images/test", "test", job)
    assert str(missing.value) == (
        f"data.test.uri: {remote}/images/test needs {remote}/labels/test, which holds no objects"
    )


@pytest.mark.timeout(120)
def test_the_runs_error_about_a_staged_file_names_its_s3_object_not_the_cache(
    isolated: Path, yolo: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    remote = upload_yolo(s3_server, s3_bucket, yolo / "yolo", "shapes", "images-folders")
    s3_server.client().put_object(Bucket=s3_bucket, Key="shapes/labels/val/0001.txt", Body=b"7 0.5 0.5 0.2 0.2\n")
    data = {split: {"uri": f"{remote}/images/{split}", "format": "yolo"} for split in ("train", "val")}
    model = {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"}
    job = make_job(isolated, isolated, task="detection", model=model, storage={"endpointUrl": s3_server.endpoint_url},
                   data={**data, "staging": {"cacheDir": str(isolated / "cache")}})  # fmt: skip
    code, report = run_main(isolated, job)
    assert code == ExitCode.INVALID
    assert f"{remote}/labels/val/0001.txt line 1: class id 7" in report["reason"], report["reason"]
    assert str(isolated / "cache") not in report["reason"]
