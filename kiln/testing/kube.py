"""A small JSON client for the Kubernetes REST API: plain dicts in, plain dicts out.

The harness and the executor need a dozen calls; dicts keep them in the API's own camelCase
vocabulary (what ``kubectl get -o yaml`` shows) and away from generated model classes.
"""

from __future__ import annotations

import base64
import json
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

import urllib3
import yaml

JSON = dict[str, Any]
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class ApiError(Exception):
    """A non-2xx answer; ``status`` is the HTTP code and ``body`` the decoded Status object."""

    def __init__(self, method: str, path: str, status: int, body: JSON):
        self.status = status
        self.body = body
        self.reason = str(body.get("reason", ""))
        super().__init__(f"{method} {path}: {status} {body.get('message', body)}")


class KubeClient:
    """Talks to one apiserver as one identity, read from a kubeconfig's current context."""

    def __init__(self, kubeconfig: Path, *, timeout: float = 30.0, pool_size: int = 4):
        config = yaml.safe_load(kubeconfig.read_text())
        context = _named(config["contexts"], config["current-context"])["context"]
        cluster = _named(config["clusters"], context["cluster"])["cluster"]
        user = _named(config["users"], context["user"])["user"]
        self.server = cluster["server"].rstrip("/")
        self.namespace = context.get("namespace", "default")
        # urllib3 wants files for certificates; a kubeconfig may only embed them.
        self._files = tempfile.TemporaryDirectory(prefix="kiln-kube-")
        self._headers = {"Accept": "application/json"}
        if token := user.get("token"):
            self._headers["Authorization"] = f"Bearer {token}"
        pool_options: dict[str, Any] = {"ca_certs": self._materialize(cluster, "certificate-authority")}
        if "client-certificate-data" in user or "client-certificate" in user:
            pool_options["cert_file"] = self._materialize(user, "client-certificate")
            pool_options["key_file"] = self._materialize(user, "client-key")
        self._pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            timeout=urllib3.Timeout(total=timeout),
            retries=False,
            maxsize=pool_size,
            **pool_options,
        )

    def _materialize(self, section: dict[str, str], field: str) -> str:
        if field in section:
            return section[field]
        path = Path(self._files.name) / field
        path.write_bytes(base64.b64decode(section[f"{field}-data"]))
        return str(path)

    def close(self) -> None:
        self._pool.clear()
        self._files.cleanup()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        headers = dict(self._headers)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        try:
            response = self._pool.request(method, f"{self.server}{path}{query}", body=payload, headers=headers)
        except urllib3.exceptions.HTTPError as error:
            # An apiserver that is down or restarting: an OSError, as callers that ride it out (the executor's
            # heartbeat and sync, like a kubelet's) expect of a network failure, not urllib3's own class.
            raise ConnectionError(f"{method} {path}: {error}") from error
        decoded = json.loads(response.data) if response.data else {}
        if response.status >= 300:
            raise ApiError(method, path, response.status, decoded if isinstance(decoded, dict) else {})
        return decoded

    def get(self, path: str, **params: Any) -> JSON:
        return self.request("GET", path, params=params or None)

    def create(self, path: str, body: JSON) -> JSON:
        return self.request("POST", path, body)

    def patch(self, path: str, body: JSON, *, content_type: str = STRATEGIC_MERGE) -> JSON:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: JSON | None = None) -> JSON:
        return self.request("DELETE", path, body)

    def exists(self, path: str) -> bool:
        try:
            self.get(path)
        except ApiError as error:
            if error.status == 404:
                return False
            raise
        return True


def _named(entries: list[JSON], name: str) -> JSON:
    for entry in entries:
        if entry["name"] == name:
            return entry
    raise KeyError(f"kubeconfig has no entry named {name!r}")


def namespaced(kind_plural: str, namespace: str, name: str = "", *, group_version: str = "v1") -> str:
    """The REST path of a namespaced resource, e.g. ``namespaced("pods", "ns", "p")``."""
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    return f"{prefix}/namespaces/{namespace}/{kind_plural}" + (f"/{name}" if name else "")
