"""Post-training int8 quantization of the fp32 ONNX artifact with onnxruntime's own tooling.

Both modes start with ``quant_pre_process`` (shape inference and graph optimization, which quantization needs
to place its nodes well). ``dynamic`` quantizes weights only; ``static`` writes QDQ nodes with QUInt8
activations calibrated on ``calibrationSamples`` inputs and per-channel QInt8 weights, with ``reduce_range`` on
x86 CPUs without VNNI (their int8 dot products saturate at full range). Whether the result is worth deploying
is decided afterwards from its measured metric and latency (``kiln.trainer.export.pipeline``).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from kiln.trainer.errors import one_line
from kiln.trainer.export.failures import ExportFailed
from kiln.trainer.export.formats import INPUT_NAME
from kiln.trainer.export.inputs import InputSource

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 8


class _Calibration(CalibrationDataReader):
    def __init__(self, inputs: InputSource, count: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: images.numpy()} for images, _ in inputs.batches(count, CALIBRATION_BATCH)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def cpu_has_vnni() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # reduce_range is an x86 concern; other CPUs quantize at full range
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def _pre_process(fp32: Path, out: Path) -> Path:
    try:
        quant_pre_process(str(fp32), str(out))
    except Exception as exc:  # symbolic shape inference gives up on some dynamic graphs: try without it
        log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", one_line(exc))
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    return out


def quantize(
    fp32: Path, out: Path, mode: Literal["dynamic", "static"], inputs: InputSource, calibration_samples: int
) -> Path:
    prepared = _pre_process(fp32, out.with_name(out.stem + ".preprocessed.onnx"))
    try:
        if mode == "dynamic":
            quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
        else:
            quantize_static(
                str(prepared), str(out), _Calibration(inputs, inputs.available(calibration_samples)),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, reduce_range=not cpu_has_vnni(),
            )  # fmt: skip
    except Exception as exc:
        raise ExportFailed(f"onnx {mode} quantization failed: {one_line(exc)}") from exc
    finally:
        prepared.unlink(missing_ok=True)
    return out
