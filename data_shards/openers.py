"""Open shard and manifest locations: a local folder, an http(s) URL or ``s3://bucket/prefix``.

We open URLs in-process (urllib for HTTP, boto3 for S3; S3-compatible stores via the
``AWS_ENDPOINT_URL`` environment variable) instead of webdataset's ``gopen``, which shells out
to ``curl`` and has no S3 scheme. Every error names the URL.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import IO

HTTP_TIMEOUT_S = 60.0


class OpenError(OSError):
    """A shard or manifest location could not be opened; the message names it."""


def is_remote(url: str) -> bool:
    """True for http(s):// and s3:// locations."""
    return url.startswith(("http://", "https://", "s3://"))


def join(root: str, *parts: str) -> str:
    """Join a folder or URL prefix with relative parts using '/' for URLs."""
    if is_remote(root):
        return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])
    return os.path.join(root, *parts)


def _s3_client():
    """A boto3 S3 client; honours ``AWS_ENDPOINT_URL`` (and ``AWS_ENDPOINT_URL_S3``)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint or None)


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise OpenError(f"{url}: an S3 location must be s3://bucket/key")
    return bucket, key


def open_stream(url: str) -> IO[bytes]:
    """Open ``url`` for sequential binary reading (a seekable file for local paths)."""
    try:
        if url.startswith(("http://", "https://")):
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (user-given URL)
        if url.startswith("s3://"):
            bucket, key = _split_s3(url)
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        return open(url, "rb")
    except OpenError:
        raise
    except FileNotFoundError:
        raise OpenError(f"{url}: no such file") from None
    except urllib.error.HTTPError as e:
        raise OpenError(f"{url}: HTTP {e.code} {e.reason}") from None
    except Exception as e:  # URLError, botocore ClientError / EndpointConnectionError, PermissionError
        raise OpenError(f"{url}: cannot open ({type(e).__name__}: {e})") from None


def read_bytes(url: str) -> bytes:
    """Read the whole object at ``url``."""
    f = open_stream(url)
    try:
        return f.read()
    except Exception as e:
        raise OpenError(f"{url}: read failed ({type(e).__name__}: {e})") from None
    finally:
        f.close()
