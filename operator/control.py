"""The control annotations (kiln.api.contract.Annotation) as the request the progress poll sends to rank 0. Pure.

Level-triggered and idempotent: the wanted state is derived from the annotations on every poll and sent until
rank 0 reports it acted on it, so a missed poll, a restarted operator or a new attempt (whose rank 0 has heard
nothing yet) needs no bookkeeping here. Only a checkpoint token already acknowledged in the status is left out, so
a new attempt does not save again for an old request.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from kiln.api.contract import Annotation, ControlRequest
from kiln.api.status import MAX_CONTROL_TOKEN, ControlStatus

log = logging.getLogger(__name__)


def control_annotations(annotations: Mapping[str, str] | None) -> tuple[str | None, str | None]:
    """The two control annotations' values, (stop, checkpoint): what a change of which is worth an early poll."""
    annotations = annotations or {}
    return annotations.get(Annotation.STOP), annotations.get(Annotation.CHECKPOINT)


def control_request(annotations: Mapping[str, str] | None, done: ControlStatus | None) -> ControlRequest | None:
    """The request for rank 0, or None when the annotations ask nothing that is still to do."""
    stop_value, token = control_annotations(annotations)
    stop = stop_value == Annotation.STOP_VALUE
    if token is not None and len(token) > MAX_CONTROL_TOKEN:
        log.warning("%s is longer than %d characters; ignored", Annotation.CHECKPOINT, MAX_CONTROL_TOKEN)
        token = None
    if not token or (done is not None and done.checkpoint_acknowledged == token):
        token = None
    if not stop and token is None:
        return None
    return ControlRequest(stop=stop, checkpoint=token)
