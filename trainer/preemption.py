"""SIGTERM handling: the signal only sets a flag; the loop all-reduces it at step boundaries.

torchrun forwards SIGTERM to each worker's whole process group, so DataLoader workers get it too; they
ignore it (``worker_init_fn``) so that the main process can finish its checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class PreemptionFlag:
    """Set by SIGTERM (and SIGINT); read by the training loop between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._event.set()
        log.warning("%s received: stopping at the next step boundary to save a checkpoint", self.signal_name)

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


def ignore_termination_in_worker(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: the main process decides when to stop, not the signal."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
