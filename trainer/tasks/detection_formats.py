"""Detection layouts, each read into a ``Listing``: every image with its size and its boxes (xyxy in original
pixels, as annotated: clipping and dropping degenerate boxes is detection_data's job, the same for every format).

- ``coco``: ``annotations.json`` (COCO instances; ``file_name`` under ``images/``) beside ``images/``. Classes are
  the categories in id order; crowd annotations (``iscrowd`` 1) are skipped, as torchvision's reference does.
- ``yolo``: the Ultralytics layout, so existing folders work as they are: ``images/`` and ``labels/<stem>.txt``
  holding ``class cx cy w h`` (normalized; a polygon ``class x1 y1 x2 y2 ...`` counts as its bounding box, as
  Ultralytics reads segment labels for detection), and ``data.yaml`` with ``names`` in the split root or above
  it. A split given as ``.../images/<split>`` finds its labels in ``.../labels/<split>``. A missing label file
  is an image without boxes, but only if ``labels/`` exists. Staging from S3 brings the labels folder and the
  data.yaml files above the split along (kiln.trainer.split_layout), so both layouts read the same from S3.
- ``voc``: ``Annotations/*.xml`` and ``JPEGImages/``. VOC's 1-based inclusive pixel indices become 0-based
  corners (xmin - 1, ymin - 1, xmax, ymax), as detectron2 reads them. An image without an XML has no boxes.

Every problem is one InvalidInput naming the file, and the line (or entry) where the file has lines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.parsers import expat

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from kiln.trainer.data import IMAGE_SUFFIXES
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry
from kiln.trainer.split_layout import DATA_YAML, IMAGES, LABELS, data_yaml_levels, labels_twin

ClassNames = tuple[str, ...]


@dataclass(frozen=True, eq=False)
class AnnotatedImage:
    path: Path
    size: tuple[int, int]  # (height, width) of the original image
    boxes: np.ndarray  # float32 [N, 4] xyxy in original pixels, as annotated
    labels: np.ndarray  # int64 [N], 0-based class indices


@dataclass(frozen=True)
class Listing:
    images: list[AnnotatedImage]
    class_names: ClassNames


def boxes_array(boxes: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidInput(f"corrupt or unreadable image {path}: {exc}") from exc
    return height, width


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_by_stem(folder: Path, stem: Path) -> Path | None:
    """The image ``folder/stem.<any image suffix>``, if there is one."""
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


GIVEN = "model.classNames, or the training split's classes"


def _shown(lookup: dict[str, int]) -> str:
    names = list(lookup)
    return f"{names[:20]}{f' ({len(names)} classes)' if len(names) > 20 else ''} ({GIVEN})"


def _index_names(found: ClassNames, given: ClassNames | None) -> dict[str, int]:
    """Class name -> index: the names given (model.classNames, or for val and test the training split's), else
    ``found``."""
    return {name: k for k, name in enumerate(given if given is not None else found)}


# -- coco --


def _coco_file(root: Path, split: str) -> Path:
    if root.is_file():
        return root
    named = root / "annotations.json"
    if named.is_file():
        return named
    candidates = sorted(root.glob("*.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise InvalidInput(
        f"data.{split}.uri: {root} has no annotations.json"
        + (f" and {len(candidates)} other .json files: name one in the uri" if candidates else "")
        + " (coco wants annotations.json beside images/)"
    )


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path} line {exc.lineno}: not valid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON: {exc}") from exc


def _entry(value: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, dict) or key not in value:
        raise InvalidInput(f"{where} has no {key}")
    found = value[key]
    if isinstance(found, bool) or not isinstance(found, kind):
        raise InvalidInput(f"{where}: {key} is {found!r}, not {getattr(kind, '__name__', 'a number')}")
    return found


def _coco_list(document: dict[str, Any], key: str, path: Path, *, required: bool = True) -> list[Any]:
    value = document.get(key, None if required else [])
    if not isinstance(value, list):
        raise InvalidInput(f"{path}: {key} is {'missing' if value is None else 'not a list'} (COCO instances JSON)")
    return value


def read_coco(root: Path, split: str, class_names: ClassNames | None) -> Listing:
    path = _coco_file(root, split)
    document = _load_json(path)
    if not isinstance(document, dict):
        raise InvalidInput(f"{path}: not a COCO instances JSON object")
    categories: dict[int, str] = {}
    for i, category in enumerate(_coco_list(document, "categories", path)):
        where = f"{path}: categories[{i}]"
        ident, name = _entry(category, "id", int, where), _entry(category, "name", str, where)
        if ident in categories or name in categories.values():
            raise InvalidInput(f"{where}: category {ident} {name!r} is listed twice")
        categories[ident] = name
    found = tuple(categories[ident] for ident in sorted(categories))
    lookup = _index_names(found, class_names)
    folder = path.parent
    images: dict[int, tuple[Path, tuple[int, int]]] = {}
    for i, image in enumerate(_coco_list(document, "images", path)):
        where = f"{path}: images[{i}]"
        ident, name = _entry(image, "id", int, where), _entry(image, "file_name", str, where)
        if ident in images:
            raise InvalidInput(f"{where}: image id {ident} is listed twice")
        file = next((f for f in (folder / "images" / name, folder / name) if f.is_file()), None)
        if file is None:
            raise InvalidInput(f"{where}: file_name {name}: {folder / 'images' / name} does not exist")
        if "width" in image and "height" in image:
            size = (_entry(image, "height", int, where), _entry(image, "width", int, where))
        else:
            size = image_size(file)
        images[ident] = (file, size)
    boxes: dict[int, list[list[float]]] = {ident: [] for ident in images}
    labels: dict[int, list[int]] = {ident: [] for ident in images}
    for i, annotation in enumerate(_coco_list(document, "annotations", path, required=False)):
        where = f"{path}: annotations[{i}]"
        if isinstance(annotation, dict) and annotation.get("iscrowd"):
            continue
        image_id = _entry(annotation, "image_id", int, where)
        category = _entry(annotation, "category_id", int, where)
        bbox = _entry(annotation, "bbox", list, where)
        if image_id not in images:
            raise InvalidInput(f"{where}: image_id {image_id} is not in images")
        if category not in categories:
            raise InvalidInput(f"{where}: category_id {category} is not in categories")
        if categories[category] not in lookup:
            raise InvalidInput(f"{where}: category {categories[category]!r} is not one of {_shown(lookup)}")
        if len(bbox) != 4 or not all(_is_finite(v) for v in bbox):
            raise InvalidInput(f"{where}: bbox {bbox} is not [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        boxes[image_id].append([x, y, x + w, y + h])
        labels[image_id].append(lookup[categories[category]])
    listed = [
        AnnotatedImage(file, size, boxes_array(boxes[ident]), np.asarray(labels[ident], dtype=np.int64))
        for ident, (file, size) in images.items()
    ]
    return Listing(listed, class_names if class_names is not None else found)


def _is_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- yolo --


def _yolo_folders(root: Path, split: str) -> tuple[Path, Path]:
    """(images folder, labels folder): ``root/images`` and ``root/labels``, or for a root inside an ``images``
    folder (``data/images/train``) the same path under ``labels`` (``data/labels/train``), as Ultralytics maps
    an image to its label file."""
    twin = labels_twin(root.parts)
    if (root / IMAGES).is_dir():
        images, labels = root / IMAGES, root / LABELS
    elif twin is not None:
        images, labels = root, Path(*twin)
    else:
        raise InvalidInput(f"data.{split}.uri: {root} has no images/ (yolo wants images/, labels/ and data.yaml)")
    if not labels.is_dir():
        raise InvalidInput(f"data.{split}.uri: {root} has no labels folder {labels} (yolo wants images/ and labels/)")
    return images, labels


def _yaml_names(path: Path) -> ClassNames:
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise InvalidInput(f"{path}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    names = document.get("names") if isinstance(document, dict) else None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[k] for k in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, str | int) for n in names):
        raise InvalidInput(f"{path}: no names (a list of class names, or a map 0..N-1 -> name)")
    return tuple(str(name) for name in names)


def _yolo_names(root: Path, images: Path, split: str, given: ClassNames | None) -> ClassNames:
    """The names in the nearest data.yaml (split root, or a folder above it, where Ultralytics keeps it)."""
    above = [root, *root.parents[: data_yaml_levels(images != root / IMAGES)]]
    found = next((folder / DATA_YAML for folder in above if (folder / DATA_YAML).is_file()), None)
    if found is None:
        if given is not None:
            return given
        raise InvalidInput(f"data.{split}.uri: no data.yaml with names in {root} or above it (yolo labels hold "
                           "class ids; data.yaml names them)")  # fmt: skip
    names = _yaml_names(found)
    if given is not None and names != given:
        raise InvalidInput(f"{found}: names {list(names)} differ from {list(given)} ({GIVEN})")
    return names


def _yolo_labels(path: Path, height: int, width: int, names: ClassNames) -> tuple[list[list[float]], list[int]]:
    boxes: list[list[float]] = []
    labels: list[int] = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(part) for part in parts]
        except ValueError:
            raise InvalidInput(f"{path} line {number}: {line.strip()!r} is not 'class cx cy w h' (numbers)") from None
        polygon = len(values) >= 7 and len(values) % 2 == 1
        if len(values) != 5 and not polygon:
            raise InvalidInput(f"{path} line {number}: {len(values)} values; want 'class cx cy w h' (5)")
        if not all(math.isfinite(v) for v in values):
            raise InvalidInput(f"{path} line {number}: {line.strip()!r} holds a non-finite number")
        if not values[0].is_integer() or not 0 <= values[0] < len(names):
            raise InvalidInput(f"{path} line {number}: class id {parts[0]} is not one of data.yaml's names "
                               f"(0..{len(names) - 1})")  # fmt: skip
        if polygon:
            xs, ys = values[1::2], values[2::2]
            x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        else:
            cx, cy, w, h = values[1:]
            x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
        labels.append(int(values[0]))
    return boxes, labels


def read_yolo(root: Path, split: str, class_names: ClassNames | None) -> Listing:
    images_dir, labels_dir = _yolo_folders(root, split)
    names = _yolo_names(root, images_dir, split, class_names)
    images = _images_under(images_dir)
    stems = {image.relative_to(images_dir).with_suffix("").as_posix() for image in images}
    for label in sorted(labels_dir.rglob("*.txt")):
        if label.relative_to(labels_dir).with_suffix("").as_posix() not in stems:
            raise InvalidInput(f"label file {label} has no image in {images_dir} (same name, an image suffix)")
    listed = []
    for image in images:
        size = image_size(image)
        label = labels_dir / image.relative_to(images_dir).with_suffix(".txt")
        boxes, labels = _yolo_labels(label, *size, names) if label.is_file() else ([], [])
        listed.append(AnnotatedImage(image, size, boxes_array(boxes), np.asarray(labels, dtype=np.int64)))
    return Listing(listed, names)


# -- voc --


def parse_xml(path: Path) -> tuple[ElementTree.Element, dict[ElementTree.Element, int]]:
    """The document and the line each element starts on (ElementTree keeps no line numbers)."""
    builder = ElementTree.TreeBuilder()
    parser = expat.ParserCreate()
    lines: dict[ElementTree.Element, int] = {}

    def start(tag: str, attributes: dict[str, str]) -> None:
        lines[builder.start(tag, attributes)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as exc:
        raise InvalidInput(f"{path} line {exc.lineno}: not valid XML: {expat.ErrorString(exc.code)}") from exc
    return builder.close(), lines


def _text(element: ElementTree.Element, tag: str) -> str | None:
    found = element.find(tag)
    return found.text.strip() if found is not None and found.text and found.text.strip() else None


def _voc_objects(path: Path) -> tuple[str | None, tuple[int, int] | None, list[tuple[str, list[float], int]]]:
    """(filename, (height, width) if the XML gives one, [(class name, xyxy, line)])."""
    document, lines = parse_xml(path)
    size = document.find("size")
    height, width = (_text(size, "height"), _text(size, "width")) if size is not None else (None, None)
    known = height is not None and width is not None and height.isdigit() and width.isdigit()
    shape = (int(height), int(width)) if known and int(height) > 0 and int(width) > 0 else None  # type: ignore[arg-type]
    objects = []
    for element in document.iter("object"):
        line = lines[element]
        name, box = _text(element, "name"), element.find("bndbox")
        if name is None or box is None:
            raise InvalidInput(f"{path} line {line}: object without {'name' if name is None else 'bndbox'}")
        corners = [_text(box, key) for key in ("xmin", "ymin", "xmax", "ymax")]
        try:
            xmin, ymin, xmax, ymax = (float(c) for c in corners)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidInput(
                f"{path} line {lines[box]}: bndbox {corners} is not xmin, ymin, xmax, ymax numbers"
            ) from None
        objects.append((name, [xmin - 1, ymin - 1, xmax, ymax], line))
    return _text(document, "filename"), shape, objects


def read_voc(root: Path, split: str, class_names: ClassNames | None) -> Listing:
    images_dir, notes_dir = root / "JPEGImages", root / "Annotations"
    for folder in (images_dir, notes_dir):
        if not folder.is_dir():
            raise InvalidInput(
                f"data.{split}.uri: {root} has no {folder.name}/ (voc wants JPEGImages/ and Annotations/)"
            )
    parsed = []
    for note in sorted(notes_dir.glob("*.xml")):
        filename, shape, objects = _voc_objects(note)
        image = images_dir / filename if filename else None
        if image is None or not image.is_file():
            image = _image_by_stem(images_dir, Path(note.stem))
        if image is None:
            raise InvalidInput(f"{note}: its image {images_dir / (filename or note.stem)} does not exist")
        parsed.append((note, image, shape, objects))
    found = tuple(sorted({name for *_, objects in parsed for name, _, _ in objects}))
    lookup = _index_names(found, class_names)
    listed, annotated = [], set()
    for note, image, shape, objects in parsed:
        for name, _, line in objects:
            if name not in lookup:
                raise InvalidInput(f"{note} line {line}: class {name!r} is not one of {_shown(lookup)}")
        boxes = boxes_array([box for _, box, _ in objects])
        labels = np.asarray([lookup[name] for name, _, _ in objects], dtype=np.int64)
        listed.append(AnnotatedImage(image, shape or image_size(image), boxes, labels))
        annotated.add(image)
    for image in _images_under(images_dir):
        if image not in annotated:
            listed.append(AnnotatedImage(image, image_size(image), boxes_array([]), np.zeros(0, dtype=np.int64)))
    listed.sort(key=lambda entry: entry.path)
    return Listing(listed, class_names if class_names is not None else found)


@dataclass(frozen=True)
class FormatInfo:
    name: str
    read: Callable[[Path, str, ClassNames | None], Listing]


FORMATS: Registry[FormatInfo] = Registry("detection data format")
FORMATS.register(FormatInfo("coco", read_coco))
FORMATS.register(FormatInfo("yolo", read_yolo))
FORMATS.register(FormatInfo("voc", read_voc))
