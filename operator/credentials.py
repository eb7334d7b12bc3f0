"""Where the operator's API credentials come from: its pod's ServiceAccount, else a kubeconfig.

Read here rather than by the kubernetes package (46 MB of generated models for a dozen calls), and handed to both
kopf (``connection_info``) and the operator's own client, so the two authenticate identically. A token file is
re-read when it changes (the kubelet rotates projected tokens) and an exec plugin re-run before its credential
expires. Of a ``KUBECONFIG`` list only the first file is read (kubectl would merge them all).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kopf
import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXEC_TIMEOUT_S = 60.0
EXPIRY_MARGIN = timedelta(seconds=10)
"""Re-run an exec plugin this long before its credential expires, so no request carries a lapsing token."""


class CredentialsError(Exception):
    """One line naming the kubeconfig (or token file) and what is missing or wrong in it."""


@dataclass(frozen=True)
class Endpoint:
    server: str
    ca_path: str | None = None
    ca_pem: str | None = None
    insecure: bool = False
    namespace: str | None = None


@dataclass(frozen=True)
class Auth:
    """What a request presents. Certificate and key are files: urllib3 and ssl load them only from files."""

    token: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    expires: datetime | None = None


class Credentials:
    """An endpoint and its current ``auth()``, fetched again when stale; thread-safe. ``user`` is the kubeconfig's
    user entry; without one, ``origin`` is the ServiceAccount token file."""

    def __init__(self, endpoint: Endpoint, origin: Path, user: dict[str, Any] | None = None) -> None:
        self.endpoint, self.origin, self._user = endpoint, origin, user
        self._lock = threading.Lock()
        self._auth: Auth | None = None
        token_file = None if user is None or user.get("token") else user.get("tokenFile")  # as client-go: token first
        self._token_file = origin if user is None else self._relative(token_file) if token_file else None
        self._token_file_seen: tuple[int, int, int] | None = None
        self._files: tempfile.TemporaryDirectory[str] | None = None  # mode 0700, removed at exit
        self._written: dict[str, str] = {}
        """PEM text -> its file: fetching the same certificate again reuses the file (and the pool built on it)."""

    def auth(self) -> Auth:
        with self._lock:
            if self._auth is None or self._stale(self._auth):
                self._auth = self._fetch()
            return self._auth

    def invalidate(self) -> None:
        """After a 401 or at a kopf re-login: fetch anew on the next ``auth()``."""
        with self._lock:
            self._auth = None

    def connection_info(self, trust_env: bool) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own API client, fetched afresh; ``expiration`` makes kopf log in again
        once an exec plugin's credential lapses, as a 401 does."""
        self.invalidate()
        auth, endpoint = self.auth(), self.endpoint
        return kopf.ConnectionInfo(server=endpoint.server, ca_path=endpoint.ca_path, ca_data=endpoint.ca_pem,
                                   insecure=endpoint.insecure, scheme="Bearer" if auth.token else None,
                                   token=auth.token, certificate_path=auth.cert_path, private_key_path=auth.key_path,
                                   default_namespace=endpoint.namespace, expiration=auth.expires,
                                   trust_env=trust_env)  # fmt: skip

    def _stale(self, auth: Auth) -> bool:
        if self._token_file is not None and _stat(self._token_file) != self._token_file_seen:
            return True
        return auth.expires is not None and datetime.now(UTC) >= auth.expires - EXPIRY_MARGIN

    def _fetch(self) -> Auth:
        user = self._user or {}
        if self._token_file is not None:
            self._token_file_seen = _stat(self._token_file)
            return Auth(token=self._token_file.read_text().strip())
        if "exec" in user:
            return self._run_exec(user["exec"])
        cert, key = self._pem_or_path(user, "client-certificate"), self._pem_or_path(user, "client-key")
        return Auth(token=user.get("token"), cert_path=cert, key_path=key)

    def _relative(self, value: str) -> Path:
        """A kubeconfig's paths are relative to the kubeconfig's own directory."""
        return self.origin.parent / Path(value).expanduser()

    def _pem_or_path(self, user: dict[str, Any], field: str) -> str | None:
        if f"{field}-data" in user:
            return self._write(base64.b64decode(user[f"{field}-data"]).decode(), field)
        return str(self._relative(user[field])) if field in user else None

    def _write(self, pem: str, name: str) -> str:
        if pem not in self._written:
            self._files = self._files or tempfile.TemporaryDirectory(prefix="kiln-credentials-")
            path = Path(self._files.name) / f"{name}-{len(self._written)}.pem"  # a new name: old pools keep theirs
            path.touch(mode=0o600)
            path.write_text(pem)
            self._written[pem] = str(path)
        return self._written[pem]

    def _run_exec(self, plugin: dict[str, Any]) -> Auth:
        """client.authentication.k8s.io's ExecCredential protocol, non-interactive."""
        where = f"{self.origin}: users[].user.exec"
        if not plugin.get("command"):
            raise CredentialsError(f"{where} has no command")
        command = str(plugin["command"])
        if os.sep in command and not Path(command).is_absolute():
            command = str(self._relative(command))
        env = {**os.environ, **{e["name"]: e["value"] for e in plugin.get("env") or []}}
        info = {"apiVersion": plugin.get("apiVersion"), "kind": "ExecCredential", "spec": {"interactive": False}}
        env["KUBERNETES_EXEC_INFO"] = json.dumps(info)
        try:
            done = subprocess.run([command, *(plugin.get("args") or [])], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=EXEC_TIMEOUT_S, check=False)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CredentialsError(f"{where}: running {command} failed: {exc}") from exc
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["nothing on stderr"])[-1]
            raise CredentialsError(f"{where}: {command} exited with {done.returncode}: {last}")
        try:
            status = json.loads(done.stdout)["status"]
            expires = status.get("expirationTimestamp")
            expiry = datetime.fromisoformat(expires).astimezone(UTC) if expires else None  # RFC 3339, in UTC
            auth = Auth(token=status.get("token"), expires=expiry)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CredentialsError(f"{where}: {command} printed no ExecCredential status: {exc}") from exc
        if status.get("clientCertificateData") and status.get("clientKeyData"):
            cert = self._write(status["clientCertificateData"], "exec-certificate")
            auth = Auth(auth.token, cert, self._write(status["clientKeyData"], "exec-key"), auth.expires)
        if auth.token is None and auth.cert_path is None:
            raise CredentialsError(f"{where}: {command} returned neither status.token nor clientCertificateData")
        return auth


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()  # follows the kubelet's ..data symlink: a rotation changes the inode and mtime
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the token: {exc.strerror}") from exc
    return st.st_ino, st.st_mtime_ns, st.st_size


def load() -> Credentials:
    """The pod's ServiceAccount when in a cluster (decided as the kubernetes package does), else the kubeconfig."""
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    token, namespace = SERVICE_ACCOUNT_DIR / "token", SERVICE_ACCOUNT_DIR / "namespace"
    if not (host and port and token.is_file()):
        return from_kubeconfig()
    host = f"[{host}]" if ":" in host else host  # IPv6
    endpoint = Endpoint(f"https://{host}:{port}", ca_path=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
                        namespace=namespace.read_text().strip() if namespace.is_file() else None)  # fmt: skip
    return Credentials(endpoint, token)


def kubeconfig_path() -> Path:
    """The first file of ``$KUBECONFIG`` (a list, like ``$PATH``), else ``~/.kube/config``."""
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return Path(listed[0]).expanduser() if listed else Path.home() / ".kube" / "config"


def current_context(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kubeconfig's document and its current context's ``context`` mapping."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the kubeconfig: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise CredentialsError(f"{path}: not YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(doc, dict) or not doc.get("current-context"):
        raise CredentialsError(f"{path}: no current-context")
    return doc, _named(doc, "contexts", doc["current-context"], path)


def _named(doc: dict[str, Any], section: str, name: Any, path: Path) -> dict[str, Any]:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry.get(section[:-1]) or {}
    raise CredentialsError(f"{path}: {section} has no entry named {name!r}")


def from_kubeconfig(path: Path | None = None) -> Credentials:
    path = path or kubeconfig_path()
    doc, context = current_context(path)
    cluster = _named(doc, "clusters", context.get("cluster"), path)
    user = _named(doc, "users", context.get("user"), path)
    where = f"{path}: user {context.get('user')!r}"
    if not cluster.get("server"):
        raise CredentialsError(f"{path}: cluster {context.get('cluster')!r} has no server")
    if "auth-provider" in user:
        raise CredentialsError(f"{where}: auth-provider is not supported; use an exec plugin")
    has_cert, has_key = (any(k.startswith(field) for k in user) for field in ("client-certificate", "client-key"))
    if not (has_cert or {"token", "tokenFile", "exec"} & user.keys()):
        raise CredentialsError(f"{where} has no token, tokenFile, client-certificate or exec")
    if has_cert and not has_key:
        raise CredentialsError(f"{where} has a client-certificate but no client-key")
    ca, ca_data = cluster.get("certificate-authority"), cluster.get("certificate-authority-data")
    endpoint = Endpoint(
        server=str(cluster["server"]).rstrip("/"),
        ca_path=str(path.parent / Path(ca).expanduser()) if ca and not ca_data else None,
        ca_pem=base64.b64decode(ca_data).decode() if ca_data else None,
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        namespace=context.get("namespace"),
    )
    return Credentials(endpoint, path, user)
