"""The S3 fixtures for these tests (the lead registers kiln.testing.s3 as a plugin for the whole suite)."""

from kiln.testing.s3 import s3_bucket, s3_server  # noqa: F401
