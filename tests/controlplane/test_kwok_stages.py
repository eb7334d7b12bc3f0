"""The kwok configuration the control plane starts kwok with (no cluster needed): kwok's defaults unless a peer
operator's pod owner kind is asked for, then the default pod stages with that kind among those completed."""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln.testing.components import kwok_args


def written_config(tmp_path: Path, kinds: tuple[str, ...]) -> list[dict]:
    argv = kwok_args(tmp_path / "bin", tmp_path / "kubeconfig", 1234, tmp_path, kinds)
    (config,) = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    return list(yaml.safe_load_all(Path(config).read_text()))


def test_without_owner_kinds_kwok_keeps_its_own_defaults(tmp_path: Path) -> None:
    assert [document["kind"] for document in written_config(tmp_path, ())] == ["KwokConfiguration"]


def test_an_owner_kind_is_completed_alongside_jobs_and_the_other_default_stages_stay(tmp_path: Path) -> None:
    documents = written_config(tmp_path, ("PyTorchJob",))
    stages = {document["metadata"]["name"]: document["spec"] for document in documents if document["kind"] == "Stage"}
    assert sorted(stages) == ["pod-complete", "pod-delete", "pod-ready"]
    owner_kinds = next(expression["values"] for expression in stages["pod-complete"]["selector"]["matchExpressions"]
                       if expression["key"] == ".metadata.ownerReferences.[].kind")  # fmt: skip
    assert owner_kinds == ["Job", "PyTorchJob"]
    assert "phase: Succeeded" in stages["pod-complete"]["next"]["statusTemplate"]
    assert all(stage["resourceRef"] == {"apiGroup": "v1", "kind": "Pod"} for stage in stages.values())
