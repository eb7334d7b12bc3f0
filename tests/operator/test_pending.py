"""Why an admitted attempt's workers cannot start: pending.blocked over pods as the scheduler and the kubelet write
them, and what the state machine makes of it."""

from __future__ import annotations

from typing import Any

from test_status import RUNNING_JOB, conditions, step

from kiln.api.status import ConditionType, Phase, TrainingJobStatus
from kiln.operator.pending import Blocked, blocked
from kiln.operator.status import JobView

Obj = dict[str, Any]
UNSCHEDULABLE_MESSAGE = '0/3 nodes are available: persistentvolumeclaim "team-cache" not found.'
STARTED = JobView(exists=True, active=2, start_time="2026-01-01T11:59:00Z")


def pod(index: int, *, scheduled: Obj | None = None, waiting: Obj | None = None, init: bool = False) -> Obj:
    status: Obj = {"phase": "Pending", "conditions": [scheduled or {"type": "PodScheduled", "status": "True"}]}
    if waiting is not None:
        key = "initContainerStatuses" if init else "containerStatuses"
        status[key] = [{"name": "trainer", "ready": False, "state": {"waiting": waiting}}]
    return {
        "metadata": {
            "name": f"demo-1-{index}-abcde",
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": status,
    }


UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE_MESSAGE}
PULL_BACKOFF = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "kiln/trainer:typo"'}


def test_the_schedulers_reason_and_message_name_the_worker() -> None:
    assert blocked([pod(1), pod(0, scheduled=UNSCHEDULABLE)]) == Blocked(
        "Unschedulable", f"worker 0 (pod demo-1-0-abcde): {UNSCHEDULABLE_MESSAGE}"
    )


def test_a_container_that_cannot_be_created_is_told_by_the_kubelets_reason() -> None:
    found = blocked([pod(0), pod(1, waiting=PULL_BACKOFF)])
    assert found is not None and found.reason == "ImagePullBackOff"
    assert (
        found.message == 'worker 1 (pod demo-1-1-abcde), container trainer: Back-off pulling image "kiln/trainer:typo"'
    )
    config = {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}
    assert blocked([pod(0, waiting=config, init=True)]) == Blocked(
        "CreateContainerConfigError", 'worker 0 (pod demo-1-0-abcde), container trainer: secret "s3-creds" not found'
    )


def test_a_pod_of_no_index_is_named_as_a_pod() -> None:
    exporter = pod(0, scheduled=UNSCHEDULABLE)
    exporter["metadata"]["annotations"] = {}
    assert blocked([exporter]) == Blocked("Unschedulable", f"pod demo-1-0-abcde: {UNSCHEDULABLE_MESSAGE}")


def test_the_lowest_index_worker_speaks_for_the_gang() -> None:
    pods = [pod(1, scheduled=UNSCHEDULABLE), pod(0, waiting=PULL_BACKOFF)]
    found = blocked(pods)
    assert found is not None and found.reason == "ImagePullBackOff"


def test_pods_on_their_way_are_not_blocked() -> None:
    waiting_to_schedule = {"type": "PodScheduled", "status": "False", "reason": "SchedulerError"}
    creating = {"reason": "ContainerCreating"}
    assert blocked([]) is None
    assert blocked([pod(0, scheduled=waiting_to_schedule), pod(1, waiting=creating)]) is None
    going = pod(0, scheduled=UNSCHEDULABLE)
    going["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    assert blocked([going]) is None


def test_a_blocked_worker_turns_into_running_false_with_why_then_starting_then_running() -> None:
    created = step(TrainingJobStatus()).status
    why = Blocked("Unschedulable", f"worker 0 (pod demo-1-0-abcde): {UNSCHEDULABLE_MESSAGE}")

    stuck = step(created, STARTED, pods_checked=True, blocked=why)
    assert stuck.status.phase == Phase.PENDING
    assert conditions(stuck.status)["Running"] == ("False", "Unschedulable")
    assert [(t.type, t.reason, t.warning) for t in stuck.transitions] == [
        (ConditionType.RUNNING, "Unschedulable", True)
    ]
    running = next(c for c in stuck.status.conditions if c.type == ConditionType.RUNNING)
    assert running.message == why.message and running.last_transition_time == "2026-01-01T12:00:00Z"

    # The same reason again (a later resync) is no news: no Event; a job-event reconcile (pods not read) keeps it.
    assert step(stuck.status, STARTED, pods_checked=True, blocked=why).transitions == ()
    assert conditions(step(stuck.status, STARTED).status)["Running"] == ("False", "Unschedulable")

    freed = step(stuck.status, STARTED, pods_checked=True)
    assert conditions(freed.status)["Running"] == ("False", "PodsStarting")
    assert freed.status.phase == Phase.PENDING

    ready = step(freed.status, RUNNING_JOB)
    assert conditions(ready.status)["Running"] == ("True", "PodsRunning") and ready.status.phase == Phase.RUNNING


def test_no_blocker_and_no_earlier_one_adds_nothing() -> None:
    created = step(TrainingJobStatus()).status
    checked = step(created, STARTED, pods_checked=True)
    assert "Running" not in conditions(checked.status) and checked.transitions == ()
