"""Checkpoints on any ``kiln.storage`` store (s3:// or a local folder), written atomically, kept by policy,
and found again on restart.

Layout under ``checkpoint.uri``::

    step-000001234/state.pt    the full training state (torch.save)
    step-000001234/meta.json   {name, epoch, step, score, size}: enough to rebuild the index
    latest.json                the pointer: the newest checkpoint plus the index of every kept one
    best.json                  the best-scoring checkpoint by validation.metric

A save writes state.pt, then meta.json, then latest.json (and best.json): a reader that follows a pointer
always finds complete data. Loading verifies size and unpickling, and falls back to the previous checkpoint
with a warning when the newest one is corrupt or partial. Only rank 0 writes; every rank reads the
checkpoint rank 0 has verified.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.api.learning import CheckpointSpec
from kiln.api.runtime import StorageSpec
from kiln.storage import LocalStore, StorageError, Store, open_store
from kiln.trainer.distributed import broadcast_object, is_main_process

log = logging.getLogger(__name__)

LATEST, BEST, STATE, META = "latest.json", "best.json", "state.pt", "meta.json"


@dataclass(frozen=True)
class Entry:
    name: str
    epoch: int
    step: int
    score: float | None
    size: int


def entry_name(step: int) -> str:
    return f"step-{step:09d}"


class Checkpointer:
    def __init__(self, spec: CheckpointSpec, store: Store, *, mode: str) -> None:
        self.spec = spec
        self.store = store
        self.mode = mode
        self.entries: list[Entry] = []
        self.save_seconds = 0.0

    # -- policy -----------------------------------------------------------------------------------------
    def due_at_step(self, step: int) -> bool:
        return self.spec.every_steps > 0 and step % self.spec.every_steps == 0

    def due_at_epoch(self, epoch: int, last: bool) -> bool:
        return (self.spec.every_epochs > 0 and epoch % self.spec.every_epochs == 0) or last

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    @property
    def best(self) -> Entry | None:
        scored = [e for e in self.entries if e.score is not None]
        if not scored:
            return None
        best = scored[0]
        for entry in scored[1:]:
            if self._better(entry.score, best.score):  # type: ignore[arg-type]
                best = entry
        return best

    @property
    def latest(self) -> Entry | None:
        return max(self.entries, key=lambda e: e.step) if self.entries else None

    def uri(self, entry: Entry | None) -> str | None:
        return self.store.url(f"{entry.name}/{STATE}") if entry else None

    # -- save -------------------------------------------------------------------------------------------
    def save(self, state: dict[str, Any], *, epoch: int, step: int, score: float | None) -> str | None:
        """Rank 0 writes data, then pointers, then applies retention. Other ranks return at once."""
        if not is_main_process():
            return None
        started = time.monotonic()
        name = entry_name(step)
        size = self._write_state(f"{name}/{STATE}", state)
        entry = Entry(name, epoch, step, score, size)
        self.store.write_bytes(f"{name}/{META}", json.dumps(asdict(entry)).encode())
        self.entries = [e for e in self.entries if e.name != name] + [entry]
        doomed = self._retain()
        self._write_pointers()  # once, naming only the kept checkpoints: then the dropped ones can go
        for dropped in doomed:
            self.store.delete_prefix(f"{dropped.name}/")
        self.save_seconds = time.monotonic() - started
        log.info("saved checkpoint %s in %.2fs", self.store.url(name), self.save_seconds)
        return self.uri(entry)

    def _write_state(self, key: str, state: dict[str, Any]) -> int:
        """torch.save the state under ``key``, atomically; its size in bytes."""
        sizes: list[int] = []

        def save(path: Path) -> None:
            torch.save(state, path)
            sizes.append(path.stat().st_size)

        if isinstance(self.store, LocalStore):  # straight into the store's temporary sibling: no 2nd copy
            self.store.write_with(key, save)
            return sizes[0]
        with tempfile.TemporaryDirectory(prefix="kiln-ckpt-") as tmp:
            local = Path(tmp) / STATE
            save(local)
            self.store.upload_file(key, local)
        return sizes[0]

    def _write_pointers(self) -> None:
        latest = self.latest
        assert latest is not None
        index = {
            "latest": latest.name,
            "epoch": latest.epoch,
            "step": latest.step,
            "checkpoints": [asdict(e) for e in sorted(self.entries, key=lambda e: e.step)],
        }
        self.store.write_bytes(LATEST, json.dumps(index, indent=1).encode())
        best = self.best
        if best is not None:
            self.store.write_bytes(BEST, json.dumps(asdict(best)).encode())

    def _retain(self) -> list[Entry]:
        """Drop the entries the policy does not keep from the index; the dropped ones, for deletion once the
        pointers no longer name them."""
        by_step = sorted(self.entries, key=lambda e: e.step, reverse=True)
        keep = {e.name for e in by_step[: self.spec.keep_last]}
        scored = [e for e in self.entries if e.score is not None]
        sign = 1.0 if self.mode == "max" else -1.0
        scored.sort(key=lambda e: sign * (e.score or 0.0), reverse=True)
        keep |= {e.name for e in scored[: self.spec.keep_best]}
        doomed = [e for e in self.entries if e.name not in keep]
        self.entries = [e for e in self.entries if e.name in keep]
        return doomed

    # -- load -------------------------------------------------------------------------------------------
    def _read_index(self) -> list[Entry]:
        try:
            index = json.loads(self.store.read_bytes(LATEST))
            return [Entry(**e) for e in index["checkpoints"]]
        except StorageError:
            if not self.store.exists(LATEST):
                return self._scan()
            raise
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); rebuilding the index from the checkpoints present", LATEST, exc)
            return self._scan()

    def _scan(self) -> list[Entry]:
        entries = []
        for obj in self.store.list():
            if obj.key.endswith(f"/{META}"):
                try:
                    entries.append(Entry(**json.loads(self.store.read_bytes(obj.key))))
                except (ValueError, TypeError, StorageError) as exc:
                    log.warning("skipping %s: %s", obj.key, exc)
        return entries

    def _verified(self, entry: Entry) -> dict[str, Any] | None:
        key = f"{entry.name}/{STATE}"
        try:
            data = self.store.read_bytes(key)
            if len(data) != entry.size:
                raise ValueError(f"size {len(data)} bytes, expected {entry.size}")
            return _unpickle(data)
        except Exception as exc:  # a truncated pickle raises nearly anything
            log.warning(
                "checkpoint %s is corrupt or partial (%s); falling back to the previous one", self.store.url(key), exc
            )
            return None

    def load_latest(self) -> dict[str, Any] | None:
        """The newest loadable checkpoint's state, the same on every rank; None when there is none."""
        chosen: str | None = None
        state: dict[str, Any] | None = None
        if is_main_process():
            self.entries = self._read_index()
            for entry in sorted(self.entries, key=lambda e: e.step, reverse=True):
                state = self._verified(entry)
                if state is not None:
                    chosen = entry.name
                    break
            if self.entries and chosen is None:
                log.warning("no loadable checkpoint under %s; starting over", self.store.url(""))
        chosen, self.entries = broadcast_object((chosen, self.entries))
        if chosen is None:
            return None
        if state is None:
            state = _unpickle(self.store.read_bytes(f"{chosen}/{STATE}"))
        log.info("resuming from %s", self.store.url(f"{chosen}/{STATE}"))
        return state

    def load_entry(self, entry: Entry) -> dict[str, Any]:
        return _unpickle(self.store.read_bytes(f"{entry.name}/{STATE}"))

    @staticmethod
    def load_uri(uri: str, storage: StorageSpec | None = None) -> dict[str, Any]:
        """A checkpoint named by URI (checkpoint.resume): a state.pt, or a checkpoint folder holding one."""
        parent, _, key = uri.rstrip("/").rpartition("/")
        if not key.endswith(".pt"):
            parent, key = uri.rstrip("/"), STATE
        return _unpickle(open_store(parent, storage).read_bytes(key))


def _unpickle(data: bytes) -> dict[str, Any]:
    # Kiln's own checkpoints hold RNG states and the spec next to tensors, so they are full pickles.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
