"""TrainingJob.spec.data and .augmentation: the datasets, the formats each task reads, staging, and the
training-time transforms (albumentations names verbatim, checked against the catalogue by ``kiln.api.semantics``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from kiln.api.base import MAX_LIST, MAX_MAP, KilnModel, Name, Rule, RuleModel, StorageUri

# An RGB mask colour, [r, g, b] with 0..255 each.
Colour = Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=3, max_length=3)]
# Palettes beyond this many classes are not drawn by hand; index masks serve them better.
MAX_PALETTE = 1024


def _distinct_colours(palette: list[list[int]]) -> list[list[int]]:
    """The schema marks palette a set (x-kubernetes-list-type), so the apiserver refuses a repeated colour."""
    seen: set[tuple[int, ...]] = set()
    for colour in palette:
        if tuple(colour) in seen:
            raise ValueError(f"colours must be distinct: {colour} is given to two classes")
        seen.add(tuple(colour))
    return palette


Palette = Annotated[
    list[Colour],
    Field(min_length=2, max_length=MAX_PALETTE, json_schema_extra={"x-kubernetes-list-type": "set"}),
    AfterValidator(_distinct_colours),
]

Task = Literal["classification", "segmentation", "detection"]
DataFormat = Literal["imagefolder", "csv", "segmentation-folder", "coco", "yolo", "voc"]
AugmentationPreset = Literal["none", "light", "medium", "heavy"]
StagingMode = Literal["auto", "copy", "direct"]

# Which data formats each task can read; the CEL rule and the Python check both come from this table.
FORMATS_BY_TASK: dict[str, tuple[str, ...]] = {
    "classification": ("imagefolder", "csv"),
    "segmentation": ("segmentation-folder", "csv"),
    "detection": ("coco", "yolo", "voc"),
}


class DataSource(KilnModel):
    uri: StorageUri
    """Where the split lives: s3://bucket/prefix, or a local path."""

    format: DataFormat = "imagefolder"
    """Layout. Classification: imagefolder (one folder per class) or csv (path,label rows). Segmentation:
    segmentation-folder (images/ and masks/ whose files match by name, a mask being a single-channel PNG of
    class indices, or a colour image with data.palette) or csv (image,mask rows, paths relative to the csv).
    Detection: coco (annotations.json, COCO instances, beside an images/ folder), yolo (Ultralytics: images/,
    labels/<stem>.txt of normalized 'class cx cy w h' lines, and a data.yaml with names in the split or above it;
    the uri is root/<split> holding images/ and labels/, or root/images/<split> with root/labels/<split> beside it,
    and from S3 the labels and root/data.yaml are staged with the split; a missing label file is an image without
    boxes) or voc (Pascal VOC: JPEGImages/ and Annotations/*.xml). Images without boxes are negatives; boxes are
    clipped to the image and degenerate ones dropped, with one counted warning per split."""


class Staging(RuleModel):
    mode: StagingMode = "auto"
    """copy: download S3 data to a node-local cache once per node before training. direct: read local paths
    in place. auto: copy for s3:// URIs, direct for local paths."""

    cache_dir: Annotated[str, Field(max_length=1024)] | None = None
    """Node-local cache directory. Defaults to $KILN_CACHE_DIR, else ~/.cache/kiln/data. In a cluster it is a
    folder of the container's own filesystem, gone with the pod; leave it out there (see cacheClaim)."""

    cache_claim: Name | None = None
    """Cluster only: a PersistentVolumeClaim in the job's namespace that every worker pod mounts as its staging
    cache instead of an emptyDir of its own, so staged data outlives the pods: a restarted attempt, and any job
    that stages the same URI through the same claim, finds it staged and downloads nothing. ReadWriteMany for
    jobs of more than one node (a ReadWriteOnce volume is mounted on one node only); its filesystem must support
    flock (local disks, NFSv4, CephFS do). Defaults to the operator's stagingCacheClaim setting, unless
    cacheDir is given; with neither, each pod stages into an emptyDir."""

    parallelism: Annotated[int, Field(ge=1, le=256)] = 16
    """Concurrent downloads while staging."""

    __rules__ = (
        Rule(
            cel="!(has(self.cacheClaim) && has(self.cacheDir))",
            message="cacheClaim and cacheDir are exclusive: the claim is mounted where the trainer caches",
            holds=lambda s: not (s.cache_claim is not None and s.cache_dir is not None),
            field="cacheClaim",
        ),
    )


class Normalization(KilnModel):
    mean: Annotated[list[float], Field(min_length=1, max_length=4)]
    """Per-channel mean, on the 0..1 scale."""

    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=4)]
    """Per-channel standard deviation, on the 0..1 scale."""


class DataSpec(RuleModel):
    train: DataSource
    """The training split."""

    val: DataSource | None = None
    """The validation split. Exclusive with valSplit."""

    val_split: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Hold out this fraction of the training split for validation, instead of a separate val split."""

    test: DataSource | None = None
    """The test split, evaluated once at the end on the best checkpoint; per-image predictions are written."""

    image_size: Annotated[int, Field(ge=8, le=4096)] = 224
    """Square input size in pixels that images are resized to."""

    batch_size: Annotated[int, Field(ge=1, le=65536)] = 32
    """Batch size per process. The global batch is batchSize x world size x gradAccumulation."""

    workers: Annotated[int, Field(ge=0, le=64)] = 4
    """DataLoader worker processes per training process."""

    ignore_index: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Segmentation only: the mask value that marks pixels to leave out of the loss and the metrics (borders,
    unlabelled areas). 255 when omitted (65535 above 255 classes); it must not be a class index, so at least
    numClasses (2 for binary masks)."""

    palette: Palette | None = None
    """Segmentation only: read masks as colour images, where position k of this list is class k's colour
    [r, g, b] (0..255 each). One colour per class: model.numClasses of them, or 2 (background, then foreground)
    for binary segmentation (numClasses 1). Masks may be RGB or RGBA (alpha ignored), palette-mode (P) or
    greyscale PNGs; each is read as RGB and every pixel mapped to its class. A pixel of any other colour is an
    invalid input naming the mask file, the colour and the pixel. Omitted: masks hold class indices, and a
    palette-mode PNG (VOC style) is read as the indices it stores, whatever colours its own palette shows."""

    ignore_color: Colour | None = None
    """With palette: the colour of pixels to leave out of the loss and the metrics (borders, unlabelled areas),
    read as data.ignoreIndex; for example [224, 224, 192] for VOC's borders. Not one of the palette's colours."""

    normalize: Normalization | None = None
    """Override the input normalization. By default it comes from the model's own pretrained config."""

    staging: Staging = Field(default_factory=Staging)
    """How remote data is brought to the node."""

    __rules__ = (
        Rule(
            cel="!(has(self.val) && has(self.valSplit))",
            message="val and valSplit are exclusive: give a val split or a fraction to hold out, not both",
            holds=lambda d: not (d.val is not None and d.val_split is not None),
            field="valSplit",
        ),
        Rule(
            cel="!has(self.ignoreColor) || has(self.palette)",
            message="ignoreColor names a colour of colour masks: it needs palette",
            holds=lambda d: d.ignore_color is None or d.palette is not None,
            field="ignoreColor",
        ),
        Rule(
            cel="!has(self.ignoreColor) || !has(self.palette) || !(self.ignoreColor in self.palette)",
            message="ignoreColor is one of the palette's colours: a colour marks a class or pixels to ignore, not both",
            holds=lambda d: d.ignore_color is None or d.palette is None or d.ignore_color not in d.palette,
            field="ignoreColor",
        ),
    )


class Transform(KilnModel):
    """One albumentations transform: {name: HorizontalFlip, p: 0.5}, or the same with the arguments under args."""

    # Inline arguments are fields the schema cannot list; without this the apiserver would prune them.
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})

    name: Name
    """An albumentations transform, by its class name (HorizontalFlip, RandomResizedCrop, ColorJitter, ...).
    Its arguments go beside the name ({name: HorizontalFlip, p: 0.5}) or under args, not both."""

    args: Annotated[
        dict[str, Any], Field(max_length=MAX_MAP, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True})
    ] = Field(default_factory=dict)
    """Keyword arguments passed to the transform's constructor, verbatim; the same as writing them inline."""

    @model_validator(mode="before")
    @classmethod
    def _inline_args(cls, data: Any) -> Any:
        """{name: HorizontalFlip, p: 0.5} means {name: HorizontalFlip, args: {p: 0.5}}: albumentations users write
        the former."""
        if not isinstance(data, dict):
            return data
        inline = {key: value for key, value in data.items() if key not in {"name", "args"}}
        if not inline:
            return data
        # An empty args is no conflict: the apiserver fills in its default ({}) beside inline arguments.
        if data.get("args"):
            raise PydanticCustomError(
                "kiln_rule",
                "give the transform's arguments inline or under args, not both (inline: {inline})",
                {"field": "args", "inline": ", ".join(sorted(map(str, inline)))},
            )
        return {**{key: data[key] for key in ("name",) if key in data}, "args": inline}


class AugmentationSpec(KilnModel):
    preset: AugmentationPreset = "light"
    """A ready-made training pipeline. Ignored when transforms is given."""

    transforms: Annotated[list[Transform], Field(max_length=MAX_LIST)] | None = None
    """An explicit albumentations pipeline for training, applied before resize and normalization."""

    mixup: Annotated[float, Field(ge=0, le=10)] = 0.0
    """Mixup alpha; 0 turns it off. Classification only."""

    cutmix: Annotated[float, Field(ge=0, le=10)] = 0.0
    """CutMix alpha; 0 turns it off. Classification only."""

    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Label smoothing for the cross_entropy loss (classification, and multi-class segmentation)."""
