"""Everything DDP and AMP: process-group setup, collectives, and the model/backward/step seam.

torchrun supplies RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; without them the trainer runs as a single
process with no process group. The training loop only calls ``Accelerator.prepare``, ``backward`` and
``step`` and the collective helpers below; it never branches on the device or the world size.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from kiln.trainer.errors import InvalidInput

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU), or run alone when not under torchrun."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None
        )
    return World(rank, world_size, local_rank, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank, in place; counts are reduced this way, never per-rank averages."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (the preemption flag, early stopping)."""
    if not _active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def any_rank_each(flags: tuple[bool, ...], device: torch.device) -> tuple[bool, ...]:
    """``any_rank`` for several flags in one all-reduce: the step boundary's SIGTERM and control requests cost
    one collective, not one each."""
    if not _active():
        return flags
    value = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in value.tolist())


def broadcast_object(obj: T) -> T:
    """Rank 0's value of ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on rank 0 (an empty list elsewhere)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size() if dist.get_rank() == 0 else []
    dist.gather_object(obj, out if dist.get_rank() == 0 else None, dst=0)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (pickled: for what a tensor collective cannot hold,
    such as lists of per-image tensors of different lengths and counts)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats). DDP broadcasts them before each forward,
    but the forward then updates them from the local batch, so after training they differ per rank."""
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if _active():
        dist.barrier()


@dataclass(frozen=True)
class PrecisionInfo:
    name: str
    dtype: torch.dtype
    needs_scaler: bool
    needs_cuda: bool


PRECISIONS: dict[str, PrecisionInfo] = {
    info.name: info
    for info in (
        PrecisionInfo("fp32", torch.float32, needs_scaler=False, needs_cuda=False),
        PrecisionInfo("bf16", torch.bfloat16, needs_scaler=False, needs_cuda=False),
        PrecisionInfo("fp16", torch.float16, needs_scaler=True, needs_cuda=True),
    )
}


def pick_precision(requested: str, device: torch.device) -> PrecisionInfo:
    """``auto``: bf16 on GPUs that support it, fp16 with a GradScaler on older GPUs, fp32 on CPU."""
    if requested == "auto":
        if device.type != "cuda":
            return PRECISIONS["fp32"]
        return PRECISIONS["bf16" if torch.cuda.is_bf16_supported() else "fp16"]
    info = PRECISIONS[requested]
    if info.needs_cuda and device.type != "cuda":
        raise InvalidInput(f"precision {requested} needs a CUDA device; use bf16, fp32 or auto on {device.type}")
    return info


class Accelerator:
    """DDP + AMP + gradient accumulation + clipping behind ``prepare``/``backward``/``step``."""

    def __init__(
        self,
        world: World,
        precision: PrecisionInfo,
        *,
        grad_accumulation: int = 1,
        grad_clip: float = 0.0,
        channels_last: bool = False,
        compile_model: bool = False,
        find_unused_parameters: bool = False,
    ) -> None:
        self.world = world
        self.find_unused_parameters = find_unused_parameters
        self.precision = precision
        self.grad_accumulation = grad_accumulation
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        self.compile_model = compile_model
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_scaler)
        self._micro_step = 0  # micro-batches done in the current window
        self.stepped = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device, set the memory format, wrap in DDP and optionally torch.compile."""
        model = model.to(self.world.device).to(memory_format=self.memory_format)
        if self.world.world_size > 1:
            devices = [self.world.local_rank] if self.world.device.type != "cpu" else None
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=devices, find_unused_parameters=self.find_unused_parameters
            )
        if self.compile_model:
            model = torch.compile(model)  # type: ignore[assignment]
        return model

    def rewrap(self, model: nn.Module) -> nn.Module:
        """``prepare`` the bare module again. DDP registers the parameters that require a gradient when it is
        built; when that set changes (a frozen part unfreezes) the old wrapper would leave the new ones
        unsynchronized. Call it between optimizer steps, where no accumulated gradient is waiting."""
        return self.prepare(unwrap(model))

    def to_device(self, value: Any) -> Any:
        """A tensor on the device (4-D ones in the memory format); lists and tuples of them element-wise
        (detection batches hold one image and one box tensor per image); anything else as it is."""
        if isinstance(value, list | tuple):
            return type(value)(self.to_device(item) for item in value)
        if not isinstance(value, torch.Tensor):
            return value
        tensor = value
        if tensor.dim() == 4:
            return tensor.to(self.world.device, non_blocking=True, memory_format=self.memory_format)
        return tensor.to(self.world.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        enabled = self.precision.dtype != torch.float32
        return torch.autocast(self.world.device.type, dtype=self.precision.dtype, enabled=enabled)

    def _window_ends(self, last: bool) -> bool:
        """Whether this micro-batch closes its accumulation window (the epoch's last batch always does)."""
        return last or (self._micro_step + 1) % self.grad_accumulation == 0

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, *, last: bool = False) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on every micro-batch but the last of its window."""
        inner = getattr(model, "_orig_mod", model)
        no_sync = getattr(inner, "no_sync", None)
        context = no_sync() if (no_sync is not None and not self._window_ends(last)) else contextlib.nullcontext()
        with context:
            yield

    def backward(self, loss: torch.Tensor, *, last: bool = False) -> None:
        window = self.grad_accumulation if not last else (self._micro_step % self.grad_accumulation) + 1
        self.scaler.scale(loss / window).backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, last: bool = False) -> bool:
        """Finish a micro-batch; at the end of a window clip, step and zero. True when the optimizer stepped."""
        self.stepped = self._window_ends(last)
        self._micro_step = 0 if self.stepped else self._micro_step + 1
        if not self.stepped:
            return False
        if self.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
