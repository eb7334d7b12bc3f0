"""The operator's credentials loader and its client: kubeconfigs (token, client certificate, exec plugin), the
in-cluster ServiceAccount token as the kubelet rotates it, one-line errors, and requests to a real HTTP server
(and, marked controlplane, to the real apiserver over TLS)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml

from kiln.operator import credentials as creds
from kiln.operator.kube import ApiClient, ApiException, Kube
from kiln.testing.controlplane import ControlPlane

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubeconfig(
    path: Path, user: dict[str, Any], server: str = "https://api.example:6443", cluster: dict[str, Any] | None = None
) -> Path:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": "vision"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


EXEC_PLUGIN = f"""#!{sys.executable}
import json, os, sys
from datetime import UTC, datetime, timedelta
count = os.path.join(os.path.dirname(sys.argv[0]), "runs")
runs = int(open(count).read()) + 1 if os.path.exists(count) else 1
open(count, "w").write(str(runs))
if os.environ.get("FAIL"):
    sys.exit("boom: " + os.environ["FAIL"])
info = json.loads(os.environ["KUBERNETES_EXEC_INFO"])
expires = datetime.now(UTC) + timedelta(seconds=int(os.environ["EXPIRES_IN_S"]))
status = {{"token": f"{{sys.argv[1]}}-{{runs}}", "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}
if os.environ.get("WITH_CERT"):
    status = {{"clientCertificateData": f"cert {{runs}}", "clientKeyData": f"key {{runs}}"}}
print(json.dumps({{"apiVersion": info["apiVersion"], "kind": "ExecCredential", "status": status}}))
"""


def exec_user(tmp_path: Path, expires_in_s: int, **env: str) -> dict[str, Any]:
    plugin = tmp_path / "bin" / "plugin"
    plugin.parent.mkdir()
    plugin.write_text(EXEC_PLUGIN)
    plugin.chmod(0o755)
    variables = {"EXPIRES_IN_S": str(expires_in_s), **env}
    return {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./bin/plugin", "args": ["tok"],
                     "env": [{"name": k, "value": v} for k, v in variables.items()]}}  # fmt: skip


def plugin_runs(tmp_path: Path) -> int:
    return int((tmp_path / "bin" / "runs").read_text())


def test_a_token_kubeconfig(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", {"token": "abc"}, cluster={"certificate-authority-data": b64(PEM)})
    loaded = creds.from_kubeconfig(path)
    assert loaded.endpoint == creds.Endpoint("https://api.example:6443", ca_pem=PEM, namespace="vision")
    assert loaded.auth() == creds.Auth(token="abc")
    info = loaded.connection_info(trust_env=False)
    assert (info.server, info.token, info.scheme, info.ca_data, info.default_namespace) == (
        "https://api.example:6443", "abc", "Bearer", PEM, "vision")  # fmt: skip


def test_kubeconfig_is_the_first_file_of_the_KUBECONFIG_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = kubeconfig(tmp_path / "config", {"token": "abc"})
    monkeypatch.setenv("KUBECONFIG", f"{path}{os.pathsep}{tmp_path / 'other'}")
    assert creds.from_kubeconfig().origin == path
    assert creds.load().endpoint.namespace == "vision"  # the Lease's namespace out of a cluster


def test_client_certificate_data_becomes_private_files(tmp_path: Path) -> None:
    user = {"client-certificate-data": b64(PEM), "client-key-data": b64(KEY)}
    path = kubeconfig(
        tmp_path / "config", user, cluster={"certificate-authority": "ca.crt", "insecure-skip-tls-verify": True}
    )
    loaded = creds.from_kubeconfig(path)
    auth = loaded.auth()
    assert auth.cert_path and auth.key_path and auth.token is None
    assert (Path(auth.cert_path).read_text(), Path(auth.key_path).read_text()) == (PEM, KEY)
    assert Path(auth.key_path).stat().st_mode & 0o777 == 0o600
    assert loaded.endpoint.ca_path == str(tmp_path / "ca.crt")  # relative to the kubeconfig
    assert loaded.endpoint.insecure
    loaded.invalidate()
    assert loaded.auth() == auth  # the same certificate, the same files (and so the same connection pool)


def test_an_exec_plugin_runs_once_while_its_token_is_valid(tmp_path: Path) -> None:
    loaded = creds.from_kubeconfig(kubeconfig(tmp_path / "config", exec_user(tmp_path, expires_in_s=3600)))
    first = loaded.auth()
    assert first.token == "tok-1" and first.expires is not None
    assert loaded.auth() == first
    assert plugin_runs(tmp_path) == 1
    info = loaded.connection_info(trust_env=False)  # a kopf login fetches afresh
    assert (info.token, info.expiration) == ("tok-2", loaded.auth().expires)


def test_an_expired_exec_credential_runs_the_plugin_again(tmp_path: Path) -> None:
    loaded = creds.from_kubeconfig(kubeconfig(tmp_path / "config", exec_user(tmp_path, expires_in_s=-60)))
    assert [loaded.auth().token for _ in range(3)] == ["tok-1", "tok-2", "tok-3"]


def test_an_exec_plugin_may_return_a_client_certificate(tmp_path: Path) -> None:
    loaded = creds.from_kubeconfig(kubeconfig(tmp_path / "config", exec_user(tmp_path, 3600, WITH_CERT="1")))
    auth = loaded.auth()
    assert auth.token is None and auth.cert_path and auth.key_path
    assert Path(auth.cert_path).read_text() == "cert 1"


def test_a_failing_exec_plugin_is_one_line_naming_the_kubeconfig(tmp_path: Path) -> None:
    path = kubeconfig(tmp_path / "config", exec_user(tmp_path, 3600, FAIL="no login"))
    with pytest.raises(creds.CredentialsError) as failed:
        creds.from_kubeconfig(path).auth()
    assert str(failed.value) == f"{path}: users[].user.exec: {tmp_path}/bin/plugin exited with 1: boom: no login"


def test_in_cluster_the_token_is_read_again_after_the_kubelet_rotates_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kubelet's layout for a projected volume: files behind ..data, swapped atomically to a new directory.
    def project(version: str, token: str) -> None:
        (tmp_path / version).mkdir()
        for name, text in [("token", token), ("ca.crt", PEM), ("namespace", "kiln-system")]:
            (tmp_path / version / name).write_text(text)
        (tmp_path / "..data_tmp").symlink_to(version)
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")

    project("..v1", "first")
    for name in ("token", "ca.crt", "namespace"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    monkeypatch.setattr(creds, "SERVICE_ACCOUNT_DIR", tmp_path)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    loaded = creds.load()
    assert loaded.endpoint == creds.Endpoint("https://[fd00::1]:443", ca_path=str(tmp_path / "ca.crt"),
                                             namespace="kiln-system")  # fmt: skip
    assert loaded.auth().token == "first"
    project("..v2", "second")
    assert loaded.auth().token == "second"


def test_outside_a_cluster_the_kubeconfig_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(creds, "SERVICE_ACCOUNT_DIR", tmp_path / "absent")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "config", {"token": "abc"})))
    assert creds.load().auth().token == "abc"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["clusters"][0]["cluster"].pop("server"), "cluster 'c' has no server"),
        (lambda d: d["users"][0].update(user={}), "user 'u' has no token, tokenFile, client-certificate or exec"),
        (lambda d: d["users"][0].update(user={"client-certificate": "c.crt"}),
         "user 'u' has a client-certificate but no client-key"),
        (lambda d: d["contexts"][0]["context"].update(user="nobody"), "users has no entry named 'nobody'"),
        (lambda d: d.pop("current-context"), "no current-context"),
        (lambda d: d["users"][0].update(user={"auth-provider": {"name": "gcp"}}),
         "user 'u': auth-provider is not supported; use an exec plugin"),
    ],
)  # fmt: skip
def test_a_missing_field_is_one_line_naming_the_file(tmp_path: Path, edit: Any, message: str) -> None:
    path = kubeconfig(tmp_path / "config", {"token": "abc"})
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(creds.CredentialsError) as failed:
        creds.from_kubeconfig(path)
    assert str(failed.value) == f"{path}: {message}"


def test_a_missing_kubeconfig_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(creds.CredentialsError, match=r"^.*/absent: cannot read the kubeconfig: No such file"):
        creds.from_kubeconfig(tmp_path / "absent")


def test_kiln_operator_without_a_kubeconfig_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "absent"), "KILN_OPERATOR_METRICS_PORT": "0"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "operator"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"operator credentials: {tmp_path / 'absent'}: cannot read the kubeconfig: No such file or "
                     "directory"], done.stderr  # fmt: skip


class Recorder(BaseHTTPRequestHandler):
    """Answers 200 with the request echoed to the one accepted token, 401 to any other, 404 under /missing."""

    accepted = ""
    seen: list[tuple[str, str, str | None]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else None
        self.seen.append((self.command, self.headers.get("Authorization", ""), body))
        status = 200 if self.headers.get("Authorization") == f"Bearer {self.accepted}" else 401
        status = 404 if status == 200 and self.path.startswith("/missing") else status
        payload = json.dumps({"path": self.path, "body": body} if status == 200 else {"message": f"no: {status}"})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    Recorder.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_requests_carry_the_token_and_json(tmp_path: Path, server: str) -> None:
    Recorder.accepted = "abc"
    kube = Kube(ApiClient(creds.from_kubeconfig(kubeconfig(tmp_path / "config", {"token": "abc"}, server)), 4))
    answer = kube.request("PATCH", "/apis/x", {"a": 1}, query=[("labelSelector", "k=v,w=z")])
    assert answer == {"path": "/apis/x?labelSelector=k%3Dv%2Cw%3Dz", "body": '{"a": 1}'}
    with pytest.raises(ApiException) as missing:
        kube.request("GET", "/missing")
    assert (missing.value.status, missing.value.reason, str(missing.value)) == (
        404,
        "Not Found",
        "(404) Not Found: no: 404",
    )
    assert json.loads(missing.value.body or b"") == {"message": "no: 404"}


def test_a_401_fetches_a_fresh_token_and_tries_once_more(tmp_path: Path, server: str) -> None:
    Recorder.accepted = "tok-2"  # the plugin's first token was revoked before it expired
    loaded = creds.from_kubeconfig(kubeconfig(tmp_path / "config", exec_user(tmp_path, 3600), server))
    kube = Kube(ApiClient(loaded, 4))
    assert kube.request("POST", "/apis/x", {"a": 1})["body"] == '{"a": 1}'
    assert [auth for _, auth, _ in Recorder.seen] == ["Bearer tok-1", "Bearer tok-2"]
    Recorder.accepted = "never"
    with pytest.raises(ApiException) as refused:  # a 401 with a fresh token too is the caller's
        kube.request("GET", "/apis/x")
    assert refused.value.status == 401


def test_a_connection_error_surfaces_as_urllib3s(tmp_path: Path, server: str) -> None:
    closed = server.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    kube = Kube(ApiClient(creds.from_kubeconfig(kubeconfig(tmp_path / "config", {"token": "abc"}, closed)), 4))
    with pytest.raises(urllib3.exceptions.MaxRetryError):
        kube.request("GET", "/api/v1/namespaces")


@pytest.mark.controlplane
def test_the_real_apiserver_over_tls_with_a_client_certificate_and_with_an_exec_plugin(
    cluster: ControlPlane, operator_kubeconfig: Path, tmp_path: Path
) -> None:
    admin = Kube(ApiClient(creds.from_kubeconfig(cluster.kubeconfig), 4))
    assert admin.request("GET", "/api/v1/namespaces/default")["metadata"]["name"] == "default"

    # An exec plugin handing out the operator ServiceAccount's token, over the admin kubeconfig's TLS settings.
    token = yaml.safe_load(operator_kubeconfig.read_text())["users"][0]["user"]["token"]
    plugin = tmp_path / "print-token"
    plugin.write_text(f"#!/bin/sh\necho '{json.dumps({'status': {'token': token}})}'\n")
    plugin.chmod(0o755)
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": str(plugin)}}
    path = tmp_path / "exec-config"
    path.write_text(yaml.safe_dump(config))
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    kube = Kube(ApiClient(creds.from_kubeconfig(path), 4))
    answer = kube.request("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review)
    assert answer["status"]["userInfo"]["username"] == "system:serviceaccount:kiln-system:kiln-operator"
