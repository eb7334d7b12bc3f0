"""The model card: what a client needs to use an artifact without Kiln, and where it came from.

It is written as JSON next to every artifact (``<file>.card.json``) and, for ONNX, also into the model's
``metadata_props``: the whole card under ``kiln.model_card`` plus its main entries as flat keys, so tools that
show metadata (Netron, onnxruntime's ``modelmeta.custom_metadata_map``) show them directly.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx

from kiln.api.status import Quantization
from kiln.trainer.export.source import Source

CARD_KEY = "kiln.model_card"


def kiln_version() -> str:
    try:
        return version("kiln")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def model_card(
    source: Source,
    *,
    export_format: str,
    quantization: Quantization,
    input_shape: tuple[int, int, int],
    dynamic_batch: bool,
    dynamic_spatial: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    input_name: str,
) -> dict[str, Any]:
    channels, height, width = input_shape
    job = source.job
    return {
        "kilnVersion": kiln_version(),
        "task": job.spec.task,
        "format": export_format,
        "quantization": quantization,
        "classNames": list(source.class_names),
        "input": {
            "name": input_name,
            "shape": [
                "batch" if dynamic_batch else 1,
                channels,
                "height" if dynamic_spatial else height,
                "width" if dynamic_spatial else width,
            ],
            "exampleShape": [1, channels, height, width],
            "layout": "NCHW",
            "dtype": "float32",
            "colorOrder": "RGB",
            "preprocessing": source.task.preprocessing,
        },
        "normalization": {"mean": list(mean), "std": list(std)},
        "output": {"name": source.task.output_name, "meaning": source.task.output_meaning},
        "source": {
            "checkpoint": source.uri,
            "sha256": source.sha256,
            "weights": source.weights,
            "epoch": source.epoch,
            "step": source.step,
        },
        "trainingJob": {
            "name": job.name,
            "namespace": job.namespace,
            "architecture": job.spec.model.architecture,
            "encoder": job.spec.model.encoder,
            "metrics": source.metrics,
        },
    }


def write_card(card: dict[str, Any], artifact: Path) -> Path:
    path = artifact.with_name(artifact.name + ".card.json")
    path.write_text(json.dumps(card, indent=1))
    return path


def embed_in_onnx(card: dict[str, Any], path: Path) -> None:
    """Put the card into the ONNX model's metadata_props (replacing any earlier Kiln card)."""
    model = onnx.load(str(path), load_external_data=False)
    flat = {
        CARD_KEY: json.dumps(card, separators=(",", ":")),
        "kiln.version": card["kilnVersion"],
        "kiln.task": card["task"],
        "kiln.class_names": json.dumps(card["classNames"]),
        "kiln.input_shape": json.dumps(card["input"]["shape"]),
        "kiln.input_layout": card["input"]["layout"],
        "kiln.mean": json.dumps(card["normalization"]["mean"]),
        "kiln.std": json.dumps(card["normalization"]["std"]),
        "kiln.source_checkpoint": card["source"]["checkpoint"],
        "kiln.source_sha256": card["source"]["sha256"],
        "kiln.training_job": card["trainingJob"]["name"],
        "kiln.training_metrics": json.dumps(card["trainingJob"]["metrics"]),
    }
    kept = [prop for prop in model.metadata_props if not prop.key.startswith("kiln.")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in flat.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
