"""The kopf settings: the diff base only for kinds with change handlers."""

from __future__ import annotations

import kopf

from kiln.operator.kopf_settings import CHANGE_HANDLED_KINDS, ChangeHandledDiffBase, apply_kopf_settings
from kiln.operator.settings import Settings


def body(kind: str) -> kopf.Body:
    return kopf.Body({
        "apiVersion": "kiln.dev/v1alpha1" if kind == "ExportJob" else "batch/v1",
        "kind": kind,
        "metadata": {"name": "a", "namespace": "ns", "labels": {"team": "vision"}, "resourceVersion": "7"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}},
        "status": {"active": 1},
    })  # fmt: skip


def test_only_change_handled_kinds_get_an_essence() -> None:
    storage = ChangeHandledDiffBase(CHANGE_HANDLED_KINDS, prefix="kiln.dev", key="last-handled-configuration")
    reference = kopf.AnnotationsDiffBaseStorage(prefix="kiln.dev", key="last-handled-configuration")

    assert storage.build(body=body("Job")) == {}
    exported = body("ExportJob")
    essence = storage.build(body=exported)
    assert essence == reference.build(body=exported)
    assert essence["spec"] == exported["spec"] and "status" not in essence
    assert essence["spec"] is not exported["spec"]  # still kopf's copy, which later changes cannot reach


def test_the_operator_installs_it_for_exportjobs() -> None:
    settings = kopf.OperatorSettings()
    apply_kopf_settings(settings, Settings())
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, ChangeHandledDiffBase) and storage.kinds == {"ExportJob"}
    assert settings.execution.max_workers == Settings().workers


def test_kopf_watches_no_child_kind() -> None:
    """The children are watched outside kopf (child_watch): no kopf label selector is left for them."""
    settings = kopf.OperatorSettings()
    apply_kopf_settings(settings, Settings())
    for group, version, plural in (("batch", "v1", "jobs"), ("", "v1", "configmaps"), ("", "v1", "services")):
        assert list(settings.watching.label_selectors.collect(kopf.Resource(group, version, plural))) == []
