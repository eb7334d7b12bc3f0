"""A real S3-protocol server for tests: moto's server on 127.0.0.1, reached by boto3 over HTTP.

Nothing is patched: the code under test opens its own boto3 clients and talks HTTP to the server, exactly
as it would to MinIO. Use the fixtures from a conftest (the lead registers this module as a plugin)::

    pytest_plugins = ["kiln.testing.s3"]

    def test_upload(s3_bucket: str, s3_server: S3Server) -> None:
        store = open_store(f"s3://{s3_bucket}/run", s3_server.storage())

Fixtures:

- ``s3_server`` (session): a started :class:`S3Server`. For the whole session the environment holds
  fake credentials, ``AWS_ENDPOINT_URL`` pointing at the server, and settings that keep boto3 off real
  AWS and away from ~/.aws; subprocesses (torchrun, kiln run) inherit them. ``s3_server.env`` is the
  same dict, for subprocesses started with an explicit ``env=``.
- ``s3_bucket`` (function): the name of a fresh, empty bucket on that server.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from kiln.api.training import StorageSpec

if TYPE_CHECKING:
    from moto.server import ThreadedMotoServer
    from mypy_boto3_s3 import S3Client

ACCESS_KEY_ID = "KILNTESTACCESSKEY000"
SECRET_ACCESS_KEY = "kiln-test-secret-0123456789abcdefghijklmn"
REGION = "us-east-1"


class S3Server:
    """moto's S3 server in a thread of this process, listening on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self._server: ThreadedMotoServer | None = None
        self._buckets = itertools.count()
        self._client: S3Client | None = None  # boto3 clients are thread-safe; building one takes ~0.1 s
        self.endpoint_url = ""

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request at INFO to stderr, which buries test output.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        # Port 0: the OS picks a free port, so parallel test sessions never collide.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto3 (in this process or a child) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            # Never fall back to real credentials or instance metadata from the machine running the tests.
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def storage(self) -> StorageSpec:
        """The StorageSpec a TrainingJob would carry to reach this server."""
        return StorageSpec(endpoint_url=self.endpoint_url, region=REGION)

    def client(self) -> S3Client:
        """A plain boto3 client on this server, for arranging and inspecting buckets in tests."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> S3Client:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        )

    def create_bucket(self, name: str | None = None, *, hint: str = "kiln-test") -> str:
        """Create a bucket and return its name; without ``name``, a unique one that starts with ``hint``."""
        if name is None:
            readable = re.sub(r"[^a-z0-9-]+", "-", hint.lower())[:40].strip("-") or "kiln-test"
            name = f"{readable}-{next(self._buckets)}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running S3 server for the session, with the environment pointing boto3 at it."""
    server = S3Server().start()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh bucket, named after the test so a failing test's objects are easy to find."""
    return s3_server.create_bucket(hint=request.node.name)
