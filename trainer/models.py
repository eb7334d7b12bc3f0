"""Building the network: Kiln's own tiny flavors, any timm architecture, or a user's plugin; then weights.

Resolution order for ``model.architecture``: ``model.source`` (a plugin) when given, else a Kiln flavor
(``MODELS``), else a timm model name (checked with ``timm.is_model``). Pretrained weights load only from an
explicit URI; there is no model hub at run time.
"""

from __future__ import annotations

import importlib
import logging
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import timm
import torch
from torch import nn

from kiln.api.catalogue import unknown_name_message
from kiln.api.model import KILN_MODEL_ARGS, ModelSpec
from kiln.api.training import StorageSpec
from kiln.trainer.errors import InvalidInput
from kiln.trainer.registry import Registry

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kiln.models"
ModelFactory = Callable[..., nn.Module]
T = TypeVar("T")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: ModelFactory
    description: str


MODELS: Registry[ModelInfo] = Registry("model")


class DebugCNN(nn.Module):
    """Three conv blocks and a linear head: trains in seconds on CPU, for tests and small demos."""

    def __init__(self, num_classes: int, width: int = 32, in_chans: int = 3) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(in_chans, width, 1), block(width, width * 2, 2), block(width * 2, width * 4, 2)
        )
        self.head = nn.Linear(width * 4, num_classes)
        # timm-style metadata: preprocessing comes from the model, not from config.
        self.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "classifier": "head"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


MODELS.register(ModelInfo("debug", lambda num_classes, **args: DebugCNN(num_classes, width=8, **args), "tiny CNN"))
MODELS.register(
    ModelInfo("debug_small", lambda num_classes, **args: DebugCNN(num_classes, width=32, **args), "small CNN for demos")
)


def _timm_factory(name: str) -> ModelFactory:
    if not timm.is_model(name):
        known = [*MODELS.names(), *timm.list_models()]
        raise InvalidInput(unknown_name_message("model.architecture (a timm name or a Kiln flavor)", name, known))
    return lambda num_classes, **args: timm.create_model(name, pretrained=False, num_classes=num_classes, **args)


def _plugin_factory(source: str) -> ModelFactory:
    """'pkg.module:factory', or the name of an entry point in group kiln.models. Import errors are not hidden."""
    if ":" in source:
        module_name, _, attr = source.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise InvalidInput(f"model.source: cannot import {module_name!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if not callable(factory):
            raise InvalidInput(f"model.source: {module_name} has no callable {attr!r}")
        return factory
    matches = entry_points(group=ENTRY_POINT_GROUP, name=source)
    if not matches:
        names = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
        raise InvalidInput(unknown_name_message(f"model.source entry point (group {ENTRY_POINT_GROUP})", source, names))
    entry = next(iter(matches))
    try:
        loaded: ModelFactory = entry.load()
    except ImportError as exc:  # the same verdict as 'module:factory': the image lacks what the plugin needs
        raise InvalidInput(f"model.source: entry point {source!r} ({entry.value}) cannot be imported: {exc}") from exc
    return loaded


def model_factory(spec: ModelSpec) -> ModelFactory:
    if spec.source:
        return _plugin_factory(spec.source)
    if spec.architecture in MODELS:
        return MODELS.get(spec.architecture).factory
    return _timm_factory(spec.architecture)


def model_args(spec: ModelSpec) -> dict[str, Any]:
    """model.args, refusing the arguments Kiln passes itself: the message names the field that sets each."""
    for key in spec.args:
        if key in KILN_MODEL_ARGS:
            raise InvalidInput(f"model.args.{key}: set by {KILN_MODEL_ARGS[key]}; Kiln passes it to the constructor")
    return dict(spec.args)


# How Python words a keyword a callable does not take, or one its caller already passes.
_KEYWORD_ERROR = re.compile(r"(unexpected|multiple values for) keyword argument '(\w+)'")


def construct(build: Callable[..., T], what: str, args: Mapping[str, Any], **kiln_args: Any) -> T:
    """``build(**kiln_args, **args)``, where ``args`` is model.args: a keyword from it that the constructor (or
    anything it hands keywords on to) does not take is an invalid input naming model.args.<key>."""
    try:
        return build(**kiln_args, **args)
    except TypeError as exc:
        match = _KEYWORD_ERROR.search(str(exc))
        if match is None or match.group(2) not in args:
            raise
        kind, key = match.groups()
        reason = f"{what} takes no argument {key!r}" if kind == "unexpected" else f"{what} sets {key!r} itself"
        raise InvalidInput(f"model.args.{key}: {reason}") from exc


def build_model(spec: ModelSpec, num_classes: int, storage: StorageSpec | None = None) -> nn.Module:
    """A Kiln flavor, a timm model or a plugin's network, with model.args; then model.pretrained's weights."""
    what = f"model.source {spec.source}" if spec.source else spec.architecture
    model = construct(model_factory(spec), what, model_args(spec), num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model.source: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if spec.pretrained:
        load_pretrained(model, spec.pretrained, storage)
    return model


def read_weights(uri: str, storage: StorageSpec | None) -> dict[str, torch.Tensor]:
    if uri.startswith("s3://"):
        from kiln import storage as store_module

        parent, _, key = uri.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / key
            try:
                store_module.open_store(parent, storage).download_file(key, local)
            except store_module.ObjectNotFoundError as exc:  # a wrong URI, not an outage: retrying cannot help
                raise InvalidInput(f"model.pretrained: {exc}") from exc
            return read_weights(str(local), storage)
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise InvalidInput(f"model.pretrained: {uri} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # weights_only keeps arbitrary code out; Kiln's own checkpoints also hold numpy RNG states, so the numpy
    # array types are allowed too (without them model.pretrained could not name a Kiln checkpoint).
    with torch.serialization.safe_globals([np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct]):
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # a Kiln checkpoint or a common training-script layout
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_pretrained(model: nn.Module, uri: str, storage: StorageSpec | None = None) -> None:
    """Load matching weights; tensors whose shape differs (a new classifier head) keep their initialization."""
    if not uri.startswith(("s3://", "/", ".", "file://")):
        raise InvalidInput(
            f"model.pretrained: {uri!r} is not an s3:// URI or a file; there is no model hub at run time"
        )
    weights = read_weights(uri, storage)
    if not matching_tensors(model, weights):
        raise InvalidInput(f"model.pretrained: no tensor in {uri} matches the model's parameters")
    load_matching(model, weights, uri)


def matching_tensors(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``weights`` that ``module`` has, by name and shape."""
    own = module.state_dict()
    return {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}


def load_matching(module: nn.Module, weights: dict[str, torch.Tensor], uri: str) -> None:
    usable = matching_tensors(module, weights)
    skipped = sorted(set(weights) - set(usable))
    module.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (%d skipped: %s)", len(usable), uri, len(skipped), ", ".join(skipped[:5]))


def data_config(model: nn.Module) -> dict[str, Any]:
    """Mean and std the model was trained with (timm's pretrained_cfg), ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {
        "mean": tuple(cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)),
        "std": tuple(cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)),
    }


def classifier_paths(model: nn.Module) -> tuple[str, ...]:
    """Where the classifier head sits, by module path: timm's pretrained_cfg['classifier'] (one path, or several
    for distilled models), else the module(s) ``get_classifier()`` returns; empty when the model says neither."""
    named = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if named:
        return (named,) if isinstance(named, str) else tuple(named)
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return ()
    heads = get_classifier()
    paths = {id(module): path for path, module in model.named_modules()}
    return tuple(paths[id(head)] for head in (heads if isinstance(heads, tuple) else (heads,)) if id(head) in paths)
