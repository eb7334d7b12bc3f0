"""Control requests from the operator: stop gracefully, checkpoint now.

The operator turns the TrainingJob's annotations (kiln.api.contract.Annotation) into a ``ControlRequest`` and POSTs
it to global rank 0's status server (``CONTROL_PATH``), on the same channel as its progress poll, so the pods still
need no API credentials. The HTTP thread only records what is wanted here; the loop acts on it at the next
optimizer step boundary, where the flags of every rank travel in the one all-reduce that already carries SIGTERM's
(``sync``), so every rank stops or saves at the same step. Requests are level-triggered: rank 0 keeps raising a
checkpoint request until a save acknowledges it, and a stop until the process ends.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from kiln.api.contract import ControlRequest
from kiln.api.status import ControlStatus
from kiln.trainer.distributed import any_rank_each

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Signals:
    """What every rank decided together at one step boundary."""

    preempt: bool = False
    """SIGTERM (or SIGINT) reached some rank: checkpoint and exit as preempted."""
    stop: bool = False
    """A stop was requested: checkpoint, evaluate the best checkpoint, complete."""
    checkpoint: bool = False
    """A checkpoint was requested: save now."""

    @property
    def save(self) -> bool:
        return self.preempt or self.stop or self.checkpoint


class ControlState:
    """Rank 0's record of the requests received (written by the HTTP thread) and of what answered them; on every
    rank, the last ``Signals`` the ranks agreed on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = False
        self._wanted: str | None = None
        self._acknowledged: str | None = None
        self._checkpoint: str | None = None
        self._checkpoint_step: int | None = None
        self.stopped_at_step: int | None = None
        """Set on every rank when a stop request ends the run; kept in checkpoints, so a restart still says so."""
        self.last = Signals()

    def request(self, request: ControlRequest) -> None:
        with self._lock:
            if request.stop and not self._stop:
                log.info("stop requested: saving a checkpoint at the next step boundary, then evaluating the best one")
            self._stop = self._stop or request.stop
            if request.checkpoint is not None and request.checkpoint not in (self._wanted, self._acknowledged):
                log.info("checkpoint %r requested: saving at the next step boundary", request.checkpoint)
                self._wanted = request.checkpoint

    def pending_checkpoint(self) -> str | None:
        """The requested checkpoint token no save has answered yet."""
        with self._lock:
            return self._wanted if self._wanted != self._acknowledged else None

    def acknowledge(self, token: str | None, uri: str, step: int) -> None:
        """A save that started after ``token`` was requested answers it (None: nothing was pending)."""
        if token is None:
            return
        with self._lock:
            self._acknowledged, self._checkpoint, self._checkpoint_step = token, uri, step
        log.info("checkpoint %r acknowledged: %s", token, uri)

    def sync(self, preempted: bool, device: torch.device) -> Signals:
        """One all-reduce at a step boundary, on every rank: each rank's SIGTERM flag and rank 0's requests."""
        with self._lock:
            wanted = (preempted, self._stop, self._wanted is not None and self._wanted != self._acknowledged)
        self.last = Signals(*any_rank_each(wanted, device))
        return self.last

    def status(self) -> ControlStatus | None:
        """For the report: None until something was requested (or the run stopped on request)."""
        with self._lock:
            if not (self._stop or self._acknowledged or self.stopped_at_step is not None):
                return None
            return ControlStatus(
                stop_requested=True if self._stop else None,
                stopped_at_step=self.stopped_at_step,
                checkpoint_acknowledged=self._acknowledged,
                checkpoint=self._checkpoint,
                checkpoint_step=self._checkpoint_step,
            )
