"""Builders for TrainingJob bodies and resolved specs shared by the operator tests."""

from __future__ import annotations

import copy
from typing import Any

from kiln.api import parse_manifest, resolve
from kiln.api.manifest import TrainingJob
from kiln.api.resolve import ResolvedTrainingJob
from kiln.operator.settings import Settings

SETTINGS = Settings(image="kiln/trainer:test", storage_root="s3://runs", secret_ref="s3-creds")


def body(name: str = "demo", namespace: str = "ml", uid: str = "uid-1", **spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "task": "classification",
        "model": {"architecture": "resnet18"},
        "data": {"train": {"uri": "s3://data/train"}, "val": {"uri": "s3://data/val"}},
        "epochs": 3,
        "resources": {"nodes": 2, "gpusPerNode": 4, "cpu": "8", "memory": "32Gi"},
    }
    for path, value in spec_overrides.items():
        target = spec
        keys = path.split("__")
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = value
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1},
        "spec": copy.deepcopy(spec),
    }


def resolved_from(document: dict[str, Any], settings: Settings = SETTINGS) -> ResolvedTrainingJob:
    manifest = parse_manifest(document)
    assert isinstance(manifest, TrainingJob)
    return resolve(manifest, settings.environment())
