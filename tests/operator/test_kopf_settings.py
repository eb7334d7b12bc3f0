"""What kopf is left with: the ExportJobs (with its diff base under Kiln's prefix), and none of the kinds the
operator watches itself (``watches``)."""

from __future__ import annotations

import kopf

from kiln.operator.handlers import build_registry
from kiln.operator.kopf_settings import apply_kopf_settings
from kiln.operator.settings import Settings

WATCHED_OUTSIDE_KOPF = (
    ("kiln.dev", "v1alpha1", "trainingjobs"),
    ("batch", "v1", "jobs"),
    ("", "v1", "configmaps"),
    ("", "v1", "services"),
)


def test_the_diff_base_and_workers_are_kilns() -> None:
    settings = kopf.OperatorSettings()
    apply_kopf_settings(settings, Settings())
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, kopf.AnnotationsDiffBaseStorage)
    assert storage.prefix == "kiln.dev" and storage.key == "last-handled-configuration"
    assert settings.execution.max_workers == Settings().workers


def test_kopf_handles_exportjobs_and_nothing_the_operator_watches_itself() -> None:
    registry, _ = build_registry(Settings())
    kinds = {selector.any_name for r in (registry._watching, registry._changing) for selector in r.get_all_selectors()}
    assert kinds == {"exportjobs"}
    for group, version, plural in WATCHED_OUTSIDE_KOPF:
        resource = kopf.Resource(group, version, plural)
        assert not registry._watching.has_handlers(resource) and not registry._changing.has_handlers(resource)
