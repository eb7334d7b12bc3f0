"""Shared pytest configuration.

Fixtures live in importable plugin modules and are registered here, so each owner keeps
theirs in one place:
- ``kiln.testing.fixtures``: the real control plane (``cluster``, ``namespace``, ``executor_pod``).
- ``kiln.testing.s3``: a real S3-protocol server (``s3_server``, ``s3_bucket``), moto in server mode.
"""

pytest_plugins = ["kiln.testing.fixtures", "kiln.testing.s3"]
