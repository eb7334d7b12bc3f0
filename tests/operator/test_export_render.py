"""The ExportJob's rendered ConfigMap and Job, with expectations written out independently."""

from __future__ import annotations

import json
from typing import Any

from tj_builders import SETTINGS, body, resolved_from

from kiln.api.export import ExportJobSpec
from kiln.api.export_resolve import ResolvedExportJob, resolve_export
from kiln.operator.export_render import render_export_configmap, render_export_job
from kiln.operator.render import render_job

CHECKPOINT = "s3://runs/ml/digits/checkpoints/step-000000040/state.pt"


def resolved(**spec: Any) -> ResolvedExportJob:
    document = {"source": {"trainingJob": "digits"}, **spec}
    export_spec = ExportJobSpec.model_validate(document, strict=False)
    return resolve_export("export", "ml", export_spec, checkpoint_uri=CHECKPOINT, uid="uid-e")


def pod_of(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def test_children_are_owned_by_the_exportjob_and_labelled_apart_from_trainingjobs() -> None:
    for child in (render_export_configmap(resolved()), render_export_job(resolved(), SETTINGS)):
        meta = child["metadata"]
        assert meta["name"] == "export-export" and meta["namespace"] == "ml"
        owner = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ExportJob", "name": "export", "uid": "uid-e"}
        assert meta["ownerReferences"] == [{**owner, "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"]["kiln.dev/export-job"] == "export"
        assert "kiln.dev/training-job" not in meta["labels"]  # the TrainingJob Job watch must not see it


def test_configmap_holds_the_resolved_export_and_no_secret_values() -> None:
    cm = render_export_configmap(resolved(storage={"secretRef": "s3-creds", "endpointUrl": "http://minio:9000"}))
    text = cm["data"]["exportjob.json"]
    document = json.loads(text)
    assert document["spec"]["source"]["checkpointUri"] == CHECKPOINT
    assert document["spec"]["output"]["uri"] == "s3://runs/ml/digits/export/export"
    assert document["sourceTrainingJob"] == "digits" and document["uid"] == "uid-e"
    assert document["spec"]["storage"]["secretRef"] == "s3-creds"
    assert "AWS_SECRET_ACCESS_KEY" not in text and "AWS_ACCESS_KEY_ID" not in text


def test_one_cpu_pod_runs_the_exporter_with_the_contract_paths() -> None:
    job = render_export_job(resolved(), SETTINGS)
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    pod = pod_of(job)
    container = pod["containers"][0]
    assert container["name"] == "exporter" and container["image"] == "kiln/trainer:test"
    assert container["command"] + container["args"] == ["python", "-m", "kiln.trainer.export", "--spec",
                                                       "/etc/kiln/exportjob.json"]  # fmt: skip
    assert container["resources"] == {}  # no GPU unless asked for
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["KILN_TERMINATION_LOG"] == container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/etc/kiln"] == "spec" and mounts[env["KILN_CACHE_DIR"]] == "cache"
    assert {"name": "spec", "configMap": {"name": "export-export"}} in pod["volumes"]


def test_spec_image_gpu_resources_and_placement() -> None:
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    resources = {"gpus": 1, "cpu": "2", "memory": "4Gi", "nodeSelector": {"pool": "a100"}, "tolerations": [toleration]}
    pod = pod_of(render_export_job(resolved(image="registry/kiln:1", resources=resources), SETTINGS))
    container = pod["containers"][0]
    assert container["image"] == "registry/kiln:1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1", "cpu": "2", "memory": "4Gi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == [toleration]
    assert "nodeSelector" not in pod_of(render_export_job(resolved(), SETTINGS))


def test_pod_is_pss_restricted_like_the_trainer_pods() -> None:
    pod = pod_of(render_export_job(resolved(), SETTINGS))
    trainer_pod = pod_of(render_job(resolved_from(body()), 1, SETTINGS))
    assert pod["securityContext"] == trainer_pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["automountServiceAccountToken"] is False and pod["restartPolicy"] == "Never"


def test_credentials_only_through_env_from_the_secret() -> None:
    job = render_export_job(resolved(storage={"secretRef": "team-s3", "endpointUrl": "http://minio:9000"}), SETTINGS)
    container = pod_of(job)["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "team-s3"}}]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not any(name.startswith("AWS_SECRET") or name == "AWS_ACCESS_KEY_ID" for name in env)
    assert "envFrom" not in pod_of(render_export_job(resolved(), SETTINGS))["containers"][0]


def test_the_job_retries_signals_and_disruptions_but_never_exit_codes_below_128() -> None:
    spec = render_export_job(resolved(), SETTINGS)["spec"]
    assert spec["backoffLimit"] == SETTINGS.export_retries
    disruption, exit_codes = spec["podFailurePolicy"]["rules"]
    assert disruption == {"action": "Count", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert exit_codes["action"] == "FailJob" and exit_codes["onExitCodes"]["containerName"] == "exporter"
    final = exit_codes["onExitCodes"]["values"]
    assert exit_codes["onExitCodes"]["operator"] == "In" and final == list(range(1, 128))
