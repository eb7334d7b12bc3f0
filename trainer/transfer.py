"""Transfer learning: a pretrained part of the network (the segmentation encoder, a classifier's backbone) trained
at a scaled learning rate, and frozen for the first epochs.

Freezing is a pure function of the epoch, applied as each epoch starts, so a run resumed at any epoch is in the
state an uninterrupted one would be. While frozen, the part's parameters have requires_grad=False (autograd
skips its backward entirely) and its BatchNorm layers run in eval mode: their running statistics stay the ones
the frozen weights were trained with, instead of drifting towards small, augmented batches the part cannot
adapt to. Its dropout keeps running; it has no state, and still regularizes what the trained layers see.

The optimizer holds every parameter from the start, frozen or not: a parameter without a gradient is neither
updated nor given optimizer state, so the param groups, and the checkpointed state_dict, are the same before
and after the switch. DDP registers only the parameters that require a gradient when it is built, so
``Freezer.set_epoch`` says when that set changed and the loop rebuilds the wrapper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from kiln.trainer.errors import InvalidInput

log = logging.getLogger(__name__)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(f"{root}.")


@dataclass(frozen=True)
class PretrainedPart:
    """A part of the network by module path: under one of ``include`` (everywhere when empty), under none of
    ``exclude``. A segmentation encoder is include=("encoder",); a backbone excludes the classifier head."""

    name: str  # as the spec calls it: encoder, backbone
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def contains(self, path: str) -> bool:
        inside = not self.include or any(_under(path, root) for root in self.include)
        return inside and not any(_under(path, root) for root in self.exclude)


@dataclass(frozen=True)
class Transfer:
    """What the spec asks of the part: ``freeze_epochs`` frozen epochs first (0: never frozen), and the part's
    learning rate as ``lr_scale`` times optimizer.lr (None: the same rate)."""

    part: PretrainedPart
    field: str  # the spec field to name in errors, for example model.freezeEncoder
    freeze_epochs: int = 0
    lr_scale: float | None = None

    def parameter_names(self, model: nn.Module) -> frozenset[str]:
        """The part's parameters; an error when it is empty, or is the whole network (nothing would train)."""
        names = [name for name, _ in model.named_parameters()]
        inside = frozenset(name for name in names if self.part.contains(name))
        if not inside:
            raise InvalidInput(f"{self.field}: the network has no {self.part.name} parameters to act on")
        if len(inside) == len(names):
            raise InvalidInput(f"{self.field}: the {self.part.name} is the whole network; nothing else would train")
        return inside


class Freezer:
    """Switches the part between frozen and trainable as epochs start; a no-op without a freeze."""

    def __init__(self, model: nn.Module, transfer: Transfer | None) -> None:
        self.transfer = transfer
        self.freeze_epochs = transfer.freeze_epochs if transfer is not None else 0
        part = transfer.part if transfer is not None and self.freeze_epochs else None
        # Only parameters trainable now are switched: any a model.source plugin froze itself stay frozen.
        self._params = [p for n, p in model.named_parameters() if part and part.contains(n) and p.requires_grad]
        self._norms = [m for n, m in model.named_modules() if part and part.contains(n) and isinstance(m, _BatchNorm)]
        self.frozen = False  # the model is built trainable

    def set_epoch(self, epoch: int) -> bool:
        """Put the part in epoch ``epoch``'s state (0-based; call after ``model.train()``). True when the set of
        parameters that require a gradient changed, which a DDP wrapper cannot follow."""
        frozen = epoch < self.freeze_epochs
        changed = frozen != self.frozen
        if changed:
            for param in self._params:
                param.requires_grad_(not frozen)
            self.frozen = frozen
            self._log(epoch)
        if frozen:
            for norm in self._norms:
                norm.eval()
        return changed

    def _log(self, epoch: int) -> None:
        assert self.transfer is not None  # only a freeze changes anything
        name, last = self.transfer.part.name, self.freeze_epochs
        if self.frozen:
            log.info("the %s is frozen until epoch %d ends (%d parameter tensors)", name, last, len(self._params))
        else:
            log.info("epoch %d: the %s unfreezes after %d frozen epoch(s); the whole network trains", epoch + 1, name,
                     last)  # fmt: skip
