"""Failures are one-line StorageErrors that name the URI and the reason, and never a credential."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import kiln.storage.s3
from kiln.api.training import StorageSpec
from kiln.storage import S3Store, StorageError, open_store, scrub, stage
from kiln.testing.s3 import ACCESS_KEY_ID, SECRET_ACCESS_KEY, S3Server


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _assert_clean(message: str) -> None:
    assert "\n" not in message
    assert SECRET_ACCESS_KEY not in message
    assert ACCESS_KEY_ID not in message
    assert "Traceback" not in message


@pytest.mark.timeout(60)
def test_an_unreachable_endpoint_fails_fast_with_one_line(s3_server: S3Server, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = open_store("s3://bucket/prefix", StorageSpec(endpoint_url=endpoint))
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.list()
    assert time.monotonic() - started < 30
    message = str(caught.value)
    assert message.startswith(f"s3://bucket/prefix: cannot reach endpoint {endpoint}: ")
    assert "Connection refused" in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    _assert_clean(message)


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts no connections and refuses none: SYNs go unanswered, as behind a firewall."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    # Fill the accept queue; later connection attempts then hang instead of being refused.
    fillers = [socket.socket() for _ in range(8)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for sock in [*fillers, server]:
            sock.close()


@pytest.mark.timeout(60)
def test_a_silent_endpoint_times_out_instead_of_hanging(
    s3_server: S3Server, silent_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real budget (3 attempts x 5 s, plus backoff) takes ~20 s; a 0.5 s connect timeout keeps the
    # same code path fast.
    monkeypatch.setattr(kiln.storage.s3, "CONNECT_TIMEOUT_S", 0.5)
    store = open_store("s3://bucket/prefix", StorageSpec(endpoint_url=silent_endpoint))
    with pytest.raises(StorageError) as caught:
        store.list()
    assert str(caught.value) == (
        f"s3://bucket/prefix: cannot reach endpoint {silent_endpoint}: no connection after 3 attempts of 0.5 s"
    )


def test_the_retry_budget_fits_in_thirty_seconds() -> None:
    worst_backoff = sum(2**attempt for attempt in range(1, kiln.storage.s3.MAX_ATTEMPTS))
    assert kiln.storage.s3.MAX_ATTEMPTS * kiln.storage.s3.CONNECT_TIMEOUT_S + worst_backoff < 30


@pytest.mark.timeout(60)
def test_every_operation_reports_an_unreachable_endpoint(s3_server: S3Server, tmp_path: Path) -> None:
    unreachable = StorageSpec(endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    store = open_store("s3://bucket/p", unreachable)
    source = tmp_path / "f"
    source.write_bytes(b"x" * 10)
    operations = {
        "read": lambda: store.read_bytes("k"),
        "write": lambda: store.write_bytes("k", b"v"),
        "upload": lambda: store.upload_file("k", source),
        "download": lambda: store.download_file("k", tmp_path / "out"),
        "exists": lambda: store.exists("k"),
        "delete": lambda: store.delete("k"),
        "stage": lambda: stage("s3://bucket/p", tmp_path / "cache", unreachable),
    }
    for name, operation in operations.items():
        with pytest.raises(StorageError, match="cannot reach endpoint") as caught:
            operation()
        _assert_clean(str(caught.value))
        assert "s3://bucket/p" in str(caught.value), name


def test_the_environment_endpoint_is_honoured(s3_server: S3Server, s3_bucket: str) -> None:
    # The fixture exports AWS_ENDPOINT_URL; no StorageSpec is needed.
    store = open_store(f"s3://{s3_bucket}/p")
    store.write_bytes("k", b"v")
    assert isinstance(store, S3Store)
    assert store.endpoint == s3_server.endpoint_url


def test_credentials_stay_out_of_reprs_and_errors(s3_server: S3Server, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/p", s3_server.storage())
    _assert_clean(repr(store))
    for failing in (lambda: store.read_bytes("missing"), lambda: open_store("s3://no-such-bucket/p").list()):
        with pytest.raises(StorageError) as caught:
            failing()
        _assert_clean(str(caught.value))
        _assert_clean(repr(caught.value))


def test_no_such_bucket_is_named(s3_server: S3Server) -> None:
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/p: no such bucket$"):
        open_store("s3://no-such-bucket/p").list()


def test_missing_credentials_say_what_to_set(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no S3 credentials found: set AWS_ACCESS_KEY_ID"):
        open_store("s3://bucket/p").list()


def test_scrub_removes_secrets_and_url_passwords(s3_server: S3Server) -> None:
    text = f"failed\nwith {SECRET_ACCESS_KEY} at http://user:hunter2@minio:9000/x"
    assert scrub(text) == "failed with *** at http://***@minio:9000/x"
    assert "hunter2" not in str(StorageError("http://u:hunter2@h: boom"))
