"""Control requests (kiln.dev/stop, kiln.dev/checkpoint): what the trainer does with them at a step boundary, and
the POST /control endpoint the operator sends them to."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from inprocess import CPU
from trainer_testkit import latest_pointer, make_job

from kiln.api import contract
from kiln.api.contract import ControlRequest, TrainerReport, parse_report
from kiln.trainer.control import ControlState
from kiln.trainer.observability import StatusServer, TrainerMetrics
from kiln.trainer.progress import LatestSnapshot
from kiln.trainer.trainer import Trainer

pytestmark = pytest.mark.slow

# 48 training images in batches of 8: 6 steps per epoch, reported at steps 6, 10, 12, ...


class RequestAt:
    """A reporter that sends ``request`` once rank 0 reports step ``step``, as the operator's POST would arrive
    between two reports; it keeps every report."""

    def __init__(self, control: ControlState, step: int, request: ControlRequest) -> None:
        self.control, self.step, self.request = control, step, request
        self.sent = False
        self.reports: list[TrainerReport] = []

    def report(self, snapshot: TrainerReport) -> None:
        self.reports.append(snapshot)
        if not self.sent and snapshot.progress is not None and snapshot.progress.step >= self.step:
            self.sent = True
            self.control.request(self.request)

    def close(self) -> None:
        pass


def test_a_stop_request_checkpoints_evaluates_the_best_and_ends_stopped(tmp_path: Path, tiny_data: Path) -> None:
    job = make_job(tmp_path, tiny_data, epochs=5, checkpoint={"everyEpochs": 1, "keepLast": 10})
    control = ControlState()
    reporter = RequestAt(control, 10, ControlRequest(stop=True))  # step 10: the 4th step of the second epoch
    trainer = Trainer(job, CPU, reporter=reporter, control=control)

    assert trainer.train() == "completed"
    final = trainer.snapshot()
    assert final.stopped and final.control is not None and final.control.stopped_at_step == 10
    assert final.stop_reason == "stopped on request (kiln.dev/stop) at epoch 1, step 10"
    assert final.progress is not None and (final.progress.epoch, final.progress.step) == (1, 10)

    # The checkpoint of the stop is complete: the pointer names it and its data has the recorded size.
    pointer = latest_pointer(Path(job.checkpoint_uri))
    assert pointer is not None and pointer["latest"] == "step-000000010", pointer
    entry = next(e for e in pointer["checkpoints"] if e["name"] == "step-000000010")
    assert (Path(job.checkpoint_uri) / entry["name"] / "state.pt").stat().st_size == entry["size"]
    # The best checkpoint (the validated epoch 1) was evaluated, as at the end of a run.
    evaluation = json.loads((Path(job.run_uri) / "evaluation.json").read_text())
    assert evaluation["val"]["checkpoint"].endswith("step-000000006/state.pt"), evaluation
    assert final.checkpoints is not None and [k.step for k in final.checkpoints.kept or []] == [6, 10]

    # A restart after the stop (say the pod died while evaluating) trains no further and still says Stopped.
    again = Trainer(job, CPU)
    assert again.train() == "completed"
    assert again.snapshot().stopped and again.step == 10


def test_a_checkpoint_request_saves_at_the_next_step_and_is_acknowledged(tmp_path: Path, tiny_data: Path) -> None:
    job = make_job(tmp_path, tiny_data, epochs=2, checkpoint={"everyEpochs": 0, "keepLast": 10})
    control = ControlState()
    reporter = RequestAt(control, 10, ControlRequest(checkpoint="before-lunch"))
    trainer = Trainer(job, CPU, reporter=reporter, control=control)

    assert trainer.train() == "completed"
    final = trainer.snapshot()
    assert final.control is not None and final.control.checkpoint_acknowledged == "before-lunch"
    assert final.control.checkpoint_step == 10 and final.control.stop_requested is None
    assert final.control.checkpoint is not None and final.control.checkpoint.endswith("step-000000010/state.pt")
    assert not final.stopped
    pointer = latest_pointer(Path(job.checkpoint_uri))
    assert pointer is not None
    # everyEpochs 0: only the requested checkpoint and the final one.
    assert [e["step"] for e in pointer["checkpoints"]] == [10, 12], pointer
    assert final.checkpoints is not None
    assert [(k.epoch, k.step) for k in final.checkpoints.kept or []] == [(1, 10), (2, 12)]
    # The same token again is no new request.
    control.request(ControlRequest(checkpoint="before-lunch"))
    assert control.pending_checkpoint() is None


@pytest.fixture
def rank0_server() -> tuple[StatusServer, ControlState, LatestSnapshot]:
    progress, control = LatestSnapshot(), ControlState()
    server = StatusServer(0, TrainerMetrics(), progress, host="127.0.0.1", control=control).start()
    yield server, control, progress
    server.close()


def post(port: int, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{contract.CONTROL_PATH}", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_post_control_records_the_request_and_answers_with_the_report(
    rank0_server: tuple[StatusServer, ControlState, LatestSnapshot],
) -> None:
    server, control, _ = rank0_server
    code, body = post(server.port, ControlRequest(stop=True, checkpoint="t1").model_dump_json(by_alias=True).encode())
    assert code == 200, body
    report = parse_report(body)
    assert report is not None and report.control is not None and report.control.stop_requested is True
    assert control.pending_checkpoint() == "t1"
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{contract.PROGRESS_PATH}", timeout=5) as response:
        assert json.loads(response.read())["control"] == {"stopRequested": True}

    code, body = post(server.port, b'{"stop": "maybe"}')
    assert code == 400 and "not a ControlRequest" in body
    code, body = post(server.port, json.dumps({"checkpoint": "x" * 300}).encode())
    assert code == 400


def test_only_global_rank_0_takes_control_requests() -> None:
    server = StatusServer(0, TrainerMetrics(), None, host="127.0.0.1").start()
    try:
        code, _ = post(server.port, b"{}")
        assert code == 404
    finally:
        server.close()
