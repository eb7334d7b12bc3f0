"""The formats: how each is exported, and how each is loaded back in its own runtime (onnxruntime for ONNX,
torch for pt2 and TorchScript) to be verified and benchmarked.

One ``torch.export`` trace feeds both pt2 and the dynamo ONNX exporter, with a named dynamic batch dimension
and, when onnx.dynamicSpatial is set, dynamic height and width (``Dim.AUTO``: the network's stride then adds its
own constraints instead of failing the export). When the trace or the ONNX translation fails, ONNX falls back to
the legacy TorchScript-based exporter and the reason is reported; never silently.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from kiln.api.export import ExportFormat
from kiln.trainer.errors import one_line
from kiln.trainer.export.failures import ExportFailed
from kiln.trainer.registry import Registry

log = logging.getLogger(__name__)

INPUT_NAME = "image"
Runner = Callable[[torch.Tensor], torch.Tensor]
"""A loaded artifact: a batch in, the output (on the CPU, float32) out."""


@dataclass
class Graph:
    """The network to export, its example input and the dynamic shapes; the torch.export trace is made once,
    on first use, and shared by the formats that need it."""

    module: nn.Module
    example: torch.Tensor
    output_name: str
    opset: int
    dynamic_batch: bool = True
    dynamic_spatial: bool = False
    _traced: torch.export.ExportedProgram | None = field(default=None, repr=False)
    _trace_error: Exception | None = field(default=None, repr=False)

    def dynamic_shapes(self) -> tuple[dict[int, Any]]:
        dims: dict[int, Any] = {}
        if self.dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1)
        if self.dynamic_spatial:
            dims[2] = dims[3] = torch.export.Dim.AUTO
        return (dims,)

    def traced(self) -> torch.export.ExportedProgram:
        if self._traced is None and self._trace_error is None:
            try:
                self._traced = torch.export.export(self.module, (self.example,), dynamic_shapes=self.dynamic_shapes())
            except Exception as exc:  # torch.export fails in many ways; each one is reported
                self._trace_error = exc
        if self._trace_error is not None:
            raise self._trace_error
        assert self._traced is not None
        return self._traced


@dataclass(frozen=True)
class Exported:
    exporter: Literal["dynamo", "legacy"] | None = None
    fallback_reason: str | None = None


@dataclass(frozen=True)
class FormatInfo:
    name: ExportFormat
    filename: str
    export: Callable[[Graph, Path], Exported]
    load: Callable[[Path, torch.device], Runner]
    description: str


FORMATS: Registry[FormatInfo] = Registry("export format")


# -- ONNX --------------------------------------------------------------------------------------------------
def _export_onnx(graph: Graph, path: Path) -> Exported:
    try:
        program = torch.onnx.export(
            graph.traced(), (graph.example,), dynamo=True, opset_version=graph.opset,
            input_names=[INPUT_NAME], output_names=[graph.output_name], verbose=False,
        )  # fmt: skip
        assert program is not None
        program.save(str(path))
        _name_dynamic_axes(path, graph)
        return Exported(exporter="dynamo")
    except Exception as exc:  # the dynamo exporter's failures are as varied as torch.export's
        reason = one_line(exc)[:1000]
        log.warning("the dynamo ONNX exporter failed (%s); falling back to the legacy exporter", reason)
    axes = {0: "batch"} if graph.dynamic_batch else {}
    if graph.dynamic_spatial:
        axes.update({2: "height", 3: "width"})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # reported as the fallback reason instead
            torch.onnx.export(
                graph.module, (graph.example,), str(path), dynamo=False, opset_version=graph.opset,
                input_names=[INPUT_NAME], output_names=[graph.output_name],
                dynamic_axes={INPUT_NAME: axes, graph.output_name: {0: "batch"} if graph.dynamic_batch else {}},
            )  # fmt: skip
    except Exception as legacy:
        raise ExportFailed(f"onnx: the dynamo exporter failed ({reason}), and so did the legacy one "
                           f"({one_line(legacy)})") from legacy  # fmt: skip
    return Exported(exporter="legacy", fallback_reason=reason)


def _name_dynamic_axes(path: Path, graph: Graph) -> None:
    """Give the input's dynamic axes the names clients read (batch, height, width). Exported from a traced
    program they carry torch's symbol names (s0, s77, ...); a symbol is renamed everywhere it occurs, so the
    outputs that share it say batch too."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    wanted = {0: "batch"} if graph.dynamic_batch else {}
    if graph.dynamic_spatial:
        wanted.update({2: "height", 3: "width"})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    renames = {dims[axis].dim_param: name for axis, name in wanted.items() if dims[axis].dim_param}
    if not renames:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    onnx.save(model, str(path))


def _onnx_providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(path: Path, device: torch.device) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=_onnx_providers(device))
    name = session.get_inputs()[0].name

    def run(batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: batch.detach().cpu().numpy()})[0]).float()

    return run


# -- torch.export (pt2) -----------------------------------------------------------------------------------
def _export_pt2(graph: Graph, path: Path) -> Exported:
    try:
        torch.export.save(graph.traced(), str(path))
    except Exception as exc:
        raise ExportFailed(f"pt2: torch.export failed: {one_line(exc)}") from exc
    return Exported()


def torch_runner(module: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Runner:
    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(batch.to(device)).float().cpu()

    return run


def load_pt2(path: Path, device: torch.device) -> Runner:
    return torch_runner(torch.export.load(str(path)).module().to(device), device)


# -- TorchScript (deprecated upstream) --------------------------------------------------------------------
def _export_torchscript(graph: Graph, path: Path) -> Exported:
    log.warning("torchscript is deprecated upstream in favour of torch.export: prefer the pt2 format")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings and the deprecation itself, logged above
            traced = torch.jit.trace(graph.module, (graph.example,), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:
        raise ExportFailed(f"torchscript: tracing failed: {one_line(exc)}") from exc
    return Exported()


def load_torchscript(path: Path, device: torch.device) -> Runner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecation, logged when the format was chosen
        module = torch.jit.load(str(path), map_location=device)
    return torch_runner(module.eval(), device)


FORMATS.register(FormatInfo("onnx", "model.onnx", _export_onnx, load_onnx, "ONNX via torch.onnx (dynamo)"))
FORMATS.register(FormatInfo("pt2", "model.pt2", _export_pt2, load_pt2, "torch.export ExportedProgram"))
FORMATS.register(
    FormatInfo("torchscript", "model.torchscript.pt", _export_torchscript, load_torchscript, "deprecated upstream")
)
