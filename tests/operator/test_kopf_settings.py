"""The kopf settings: the diff base only for kinds with change handlers, child watches only of Kiln's children."""

from __future__ import annotations

import kopf
from tj_builders import body as trainingjob
from tj_builders import resolved_from

from kiln.operator.kopf_settings import CHANGE_HANDLED_KINDS, ChangeHandledDiffBase, apply_kopf_settings
from kiln.operator.render import render_configmap, render_job, render_service
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


def test_child_watches_ask_the_apiserver_for_kilns_children_only() -> None:
    settings = kopf.OperatorSettings()
    apply_kopf_settings(settings, Settings())
    selectors = settings.watching.label_selectors
    for group, version, plural in (("batch", "v1", "jobs"), ("", "v1", "configmaps"), ("", "v1", "services")):
        assert list(selectors.collect(kopf.Resource(group, version, plural))) == [
            "app.kubernetes.io/managed-by=kiln-operator"
        ]
    assert list(selectors.collect(kopf.Resource("kiln.dev", "v1alpha1", "trainingjobs"))) == []
    # Every child the operator renders carries the label the selector asks for.
    resolved = resolved_from(trainingjob())
    for child in (render_configmap(resolved), render_service(resolved), render_job(resolved, 1, Settings())):
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kiln-operator"
