"""Kubeconfig files with everything embedded, so they stay valid when copied elsewhere."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from kiln.testing.certs import KeyPair


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    user: str,
    client: KeyPair | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> Path:
    """Write a single-context kubeconfig authenticating with a client cert or a bearer token."""
    if client is not None and token is None:
        credentials = {"client-certificate-data": _b64(client.cert), "client-key-data": _b64(client.key)}
    elif token is not None and client is None:
        credentials = {"token": token}
    else:
        raise ValueError("pass exactly one of client= or token=")
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kiln", "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": {"cluster": "kiln", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    path.chmod(0o600)
    return path
