"""Turn a pod's container into a local process launch: argv, env, working directory, files.

What a container runtime would provide, approximated on the host:
- volumes (ConfigMap, Secret, projected, downwardAPI, emptyDir, PVC, hostPath) are written
  under the pod's directory, and every container path under a ``mountPath`` that appears in
  command, args, env values or ``workingDir`` is rewritten to the host path;
- the ``terminationMessagePath`` file is rewritten the same way (and read back on exit);
- in-cluster DNS names of pods in the pod's subdomain (``<host>.<subdomain>[.<ns>[.svc[.cluster.local]]]``)
  and of Services in its namespace (``<svc>.<ns>.svc[.cluster.local]``) become 127.0.0.1,
  so torchrun's static rendezvous on node 0 is reachable by the other ranks;
- ``$(VAR)`` references are expanded with Kubernetes' rules before any rewriting;
- the in-cluster credentials: client libraries read the ServiceAccount token from a fixed path
  (``SERVICE_ACCOUNT_DIR``) that no rewriting reaches, so when the pod mounts it (the ServiceAccount admission's
  projected token volume) the process gets ``KUBECONFIG``, a kubeconfig with that token and CA. The in-cluster
  loaders of the kubernetes client, kopf and kubectl find no token file and fall back to it: same identity.

Images are ignored: the command must exist on the host (``python`` resolves to the
executor's own interpreter first).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.testing import executor_layout
from kiln.testing.kube import JSON, ApiError, KubeClient, namespaced
from kiln.testing.kubeconfig import write_kubeconfig

LOOPBACK = "127.0.0.1"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"
DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
# A host name ends where no further label or name character follows ("job-0.svc:29500" matches).
_NAME_START, _NAME_END = r"(?<![\w.-])", r"(?![\w-]|\.[\w-])"
# Host variables a container would get from its image; everything else stays out.
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV", "PYTHONPATH", "SSL_CERT_FILE")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where a container finds its ServiceAccount's token, ca.crt and namespace (fixed by every client library)."""


class PodConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing: the kubelet's CreateContainerConfigError (retried)."""


class UnsupportedPod(Exception):
    """The pod uses something the executor cannot emulate; it fails instead of pretending."""


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_message_path: Path
    log_path: Path


def prepare_launch(kube: KubeClient, pod: JSON, root: Path, apiserver_port: int) -> Launch:
    """Materialize the pod's files and compute how to start its single container."""
    spec, meta = pod["spec"], pod["metadata"]
    if len(spec["containers"]) != 1 or spec.get("initContainers"):
        raise UnsupportedPod("the local executor runs pods with exactly one container and no init containers")
    container = spec["containers"][0]
    if not container.get("command"):
        raise UnsupportedPod(f"container {container['name']!r} needs an explicit command: images are not run")

    directory = executor_layout.pod_dir(root, meta["namespace"], meta["name"])
    if directory.exists():  # an earlier pod of the same name
        shutil.rmtree(directory)
    rootfs = directory / "rootfs"
    rootfs.mkdir(parents=True)
    volumes = _materialize_volumes(kube, pod, directory / "volumes", root)
    path_map = {m["mountPath"]: _mount_source(volumes, m) for m in container.get("volumeMounts", [])}
    message_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_MESSAGE_PATH
    host_message_path = rootfs / message_path.lstrip("/")
    host_message_path.parent.mkdir(parents=True, exist_ok=True)
    host_message_path.touch()
    path_map[message_path] = host_message_path

    rewrite = rewriter(pod, path_map)
    base_env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base_env.get("PATH", os.defpath)])
    (directory / "tmp").mkdir()
    hostname = spec.get("hostname") or meta["name"]
    base_env |= {
        "HOSTNAME": hostname,
        "HOME": str(rootfs),
        "TMPDIR": str(directory / "tmp"),
        "KUBERNETES_SERVICE_HOST": LOOPBACK,
        "KUBERNETES_SERVICE_PORT": str(apiserver_port),
    }
    if (credentials := path_map.get(SERVICE_ACCOUNT_DIR)) is not None:
        base_env["KUBECONFIG"] = str(_service_account_kubeconfig(pod, credentials, directory, apiserver_port))
    container_env = _container_env(kube, pod, container)
    argv = [rewrite(expand(arg, container_env)) for arg in [*container["command"], *container.get("args", [])]]
    env = base_env | {name: rewrite(value) for name, value in container_env.items()}

    working_dir = container.get("workingDir")
    cwd = Path(rewrite(working_dir)) if working_dir else rootfs
    if working_dir and cwd == Path(working_dir):  # not under a mount: give it a home in the rootfs
        cwd = rootfs / working_dir.lstrip("/")
    cwd.mkdir(parents=True, exist_ok=True)
    return Launch(
        argv,
        env,
        cwd,
        host_message_path,
        executor_layout.log_path(root, meta["namespace"], meta["name"], container["name"]),
    )


# -- environment ------------------------------------------------------------------------------


_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def container_ports(pod: JSON) -> list[int]:
    """The TCP ports the pod's containers declare (the only ones a pod on the host network could collide on)."""
    return [
        port["containerPort"]
        for container in pod["spec"]["containers"]
        for port in container.get("ports", ())
        if port.get("protocol", "TCP") == "TCP"
    ]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: unknown references stay as they are, ``$$`` escapes ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, value)


def _container_env(kube: KubeClient, pod: JSON, container: JSON) -> dict[str, str]:
    """envFrom first, then env in order (later entries may reference earlier ones), like the kubelet."""
    namespace = pod["metadata"]["namespace"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        prefix = source.get("prefix", "")
        if ref := source.get("configMapRef"):
            env |= {prefix + k: v for k, v in _config_map_data(kube, namespace, ref).items()}
        if ref := source.get("secretRef"):
            env |= {prefix + k: v.decode() for k, v in _secret_data(kube, namespace, ref).items()}
    for variable in container.get("env", []):
        if "value" in variable or "valueFrom" not in variable:
            env[variable["name"]] = expand(variable.get("value", ""), env)
            continue
        value = _value_from(kube, pod, variable["valueFrom"])
        if value is not None:
            env[variable["name"]] = value
    return env


def _value_from(kube: KubeClient, pod: JSON, source: JSON) -> str | None:
    namespace = pod["metadata"]["namespace"]
    if ref := source.get("fieldRef"):
        return field_value(pod, ref["fieldPath"])
    if ref := source.get("configMapKeyRef"):
        return _pick(_config_map_data(kube, namespace, ref), ref, "ConfigMap")
    if ref := source.get("secretKeyRef"):
        raw = _pick(_secret_data(kube, namespace, ref), ref, "Secret")
        return raw.decode() if raw is not None else None
    if ref := source.get("resourceFieldRef"):
        resources = pod["spec"]["containers"][0].get("resources", {})
        kind, _, resource = ref["resource"].partition(".")
        return str(resources.get(kind, {}).get(resource, "0"))
    raise UnsupportedPod(f"unsupported env valueFrom: {sorted(source)}")


def field_value(pod: JSON, field_path: str) -> str:
    """The downward API: ``metadata.name``, ``metadata.labels['k']``, ``status.podIP``..."""
    meta, spec = pod["metadata"], pod["spec"]
    if match := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path):
        return str(meta.get(match.group(1), {}).get(match.group(2), ""))
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "metadata.labels": _lines(meta.get("labels", {})),
        "metadata.annotations": _lines(meta.get("annotations", {})),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": LOOPBACK,
        "status.podIPs": LOOPBACK,
        "status.hostIP": LOOPBACK,
        "status.hostIPs": LOOPBACK,
    }
    if field_path not in values:
        raise UnsupportedPod(f"unsupported fieldRef {field_path!r}")
    return values[field_path]


def _lines(mapping: dict[str, str]) -> str:
    return "\n".join(f'{key}="{value}"' for key, value in sorted(mapping.items()))


def _pick(data: dict[str, Any], ref: JSON, kind: str) -> Any:
    if ref["key"] in data:
        return data[ref["key"]]
    if ref.get("optional"):
        return None
    raise PodConfigError(f"couldn't find key {ref['key']} in {kind} {ref['name']}")


def _config_map_data(kube: KubeClient, namespace: str, ref: JSON) -> dict[str, str]:
    config_map = _read(kube, namespace, "configmaps", ref["name"], optional=ref.get("optional", False))
    binary = {k: base64.b64decode(v).decode(errors="replace") for k, v in config_map.get("binaryData", {}).items()}
    return {**config_map.get("data", {}), **binary}


def _secret_data(kube: KubeClient, namespace: str, ref: JSON) -> dict[str, bytes]:
    secret = _read(
        kube, namespace, "secrets", ref.get("name") or ref["secretName"], optional=ref.get("optional", False)
    )
    return {key: base64.b64decode(value) for key, value in secret.get("data", {}).items()}


def _read(kube: KubeClient, namespace: str, plural: str, name: str, *, optional: bool) -> JSON:
    try:
        return kube.get(namespaced(plural, namespace, name))
    except ApiError as error:
        if error.status != 404:
            raise
        if optional:
            return {}
        raise PodConfigError(f"{plural[:-1]} {name!r} not found") from None


# -- volumes ----------------------------------------------------------------------------------


def _materialize_volumes(kube: KubeClient, pod: JSON, directory: Path, root: Path) -> dict[str, Path]:
    """Write each volume's files; return volume name -> host directory."""
    namespace = pod["metadata"]["namespace"]
    volumes: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes", []):
        target = directory / volume["name"]
        if source := volume.get("hostPath"):
            volumes[volume["name"]] = Path(source["path"])
            continue
        if source := volume.get("persistentVolumeClaim"):
            target = executor_layout.claim_dir(root, namespace, source["claimName"])
        target.mkdir(parents=True, exist_ok=True)
        volumes[volume["name"]] = target
        if "configMap" in volume or "secret" in volume or "downwardAPI" in volume:
            _write_projection(kube, pod, volume, target)
        elif source := volume.get("projected"):
            for projection in source.get("sources", []):
                _write_projection(kube, pod, projection, target)
        elif not ({"emptyDir", "persistentVolumeClaim", "ephemeral"} & volume.keys()):
            raise UnsupportedPod(f"volume {volume['name']!r}: unsupported source {sorted(volume)}")
    return volumes


def _write_projection(kube: KubeClient, pod: JSON, source: JSON, target: Path) -> None:
    namespace = pod["metadata"]["namespace"]
    if ref := source.get("configMap"):
        _write_items(
            target, {k: v.encode() for k, v in _config_map_data(kube, namespace, ref).items()}, ref.get("items")
        )
    elif ref := source.get("secret"):
        _write_items(target, _secret_data(kube, namespace, ref), ref.get("items"))
    elif ref := source.get("downwardAPI"):
        for item in ref.get("items", []):
            value = field_value(pod, item["fieldRef"]["fieldPath"]) if "fieldRef" in item else ""
            _write_file(target / item["path"], value.encode())
    elif ref := source.get("serviceAccountToken"):
        _write_file(target / ref["path"], _service_account_token(kube, pod, ref).encode())
    elif source.get("clusterTrustBundle"):
        raise UnsupportedPod("clusterTrustBundle projections are not supported")


def _write_items(target: Path, data: dict[str, bytes], items: Iterable[JSON] | None) -> None:
    if items is None:
        for key, content in data.items():
            _write_file(target / key, content)
        return
    for item in items:
        if item["key"] not in data:
            raise PodConfigError(f"key {item['key']!r} not found")
        _write_file(target / item["path"], data[item["key"]])


def _write_file(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def _service_account_token(kube: KubeClient, pod: JSON, ref: JSON) -> str:
    meta = pod["metadata"]
    request: JSON = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": ref.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            **({"audiences": [ref["audience"]]} if ref.get("audience") else {}),
        },
    }
    account = pod["spec"].get("serviceAccountName", "default")
    path = namespaced("serviceaccounts", meta["namespace"], account) + "/token"
    return str(kube.create(path, request)["status"]["token"])


def _service_account_kubeconfig(pod: JSON, credentials: Path, directory: Path, apiserver_port: int) -> Path:
    """The pod's in-cluster identity as a kubeconfig: its projected token, the cluster CA, its namespace."""
    namespace = pod["metadata"]["namespace"]
    account = pod["spec"].get("serviceAccountName", "default")
    return write_kubeconfig(
        directory / "kubeconfig",
        server=f"https://{LOOPBACK}:{apiserver_port}",
        ca_cert=credentials / "ca.crt",
        user=f"system:serviceaccount:{namespace}:{account}",
        token=(credentials / "token").read_text(),
        namespace=namespace,
    )


def _mount_source(volumes: dict[str, Path], mount: JSON) -> Path:
    if mount["name"] not in volumes:
        raise UnsupportedPod(f"volumeMount {mount['name']!r} names no volume")
    source = volumes[mount["name"]]
    if sub_path := mount.get("subPath"):
        source = source / sub_path
    return source


# -- rewriting container paths and cluster DNS names ----------------------------------------


def rewriter(pod: JSON, path_map: dict[str, Path]) -> Callable[[str], str]:
    """Map container paths under ``path_map``'s keys to host paths, and cluster DNS names to 127.0.0.1."""
    namespace = re.escape(pod["metadata"]["namespace"])
    patterns = [rf"{DNS_LABEL}\.{namespace}\.svc(?:\.cluster\.local)?"]
    if subdomain := pod["spec"].get("subdomain"):
        patterns.insert(0, rf"{DNS_LABEL}\.{re.escape(subdomain)}(?:\.{namespace}(?:\.svc(?:\.cluster\.local)?)?)?")
    dns_name = re.compile(_NAME_START + "(?:" + "|".join(patterns) + ")" + _NAME_END)
    # Longest mount first, so /data/cache wins over /data; a path must end at a separator.
    mounts = sorted(path_map.items(), key=lambda item: len(item[0]), reverse=True)
    container_path = (
        re.compile(r"(?<![\w.-])(" + "|".join(re.escape(path.rstrip("/")) for path, _ in mounts) + r")(?=/|$|[^\w.-])")
        if mounts
        else None
    )
    hosts = {path.rstrip("/"): str(host) for path, host in mounts}

    def rewrite(value: str) -> str:
        value = dns_name.sub(LOOPBACK, value)
        if container_path is not None:
            value = container_path.sub(lambda match: hosts[match.group(1)], value)
        return value

    return rewrite
