"""Open shard and manifest locations: a local folder, an http(s) URL or ``s3://bucket/prefix``.

We open URLs in-process (urllib for HTTP, boto3 for S3; S3-compatible stores via the
``AWS_ENDPOINT_URL`` environment variable) instead of webdataset's ``gopen``, which shells out
to ``curl`` and has no S3 scheme. Every error names the URL.
"""
from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from typing import IO

HTTP_TIMEOUT_S = 60.0
RETRIES = 3
RETRY_BACKOFF_S = 0.5


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


_CLIENTS: dict[tuple[int, str | None], object] = {}


def _s3_client():
    """A boto3 S3 client per process and endpoint; honours ``AWS_ENDPOINT_URL`` (and ``_S3``)."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    key = (os.getpid(), endpoint)  # clients are not fork-safe: one per (worker) process
    if key not in _CLIENTS:
        _CLIENTS[key] = boto3.client("s3", endpoint_url=endpoint)
    return _CLIENTS[key]


def _transient(e: Exception) -> bool:
    """Worth retrying: connection problems and server-side (5xx) errors, not 4xx."""
    if isinstance(e, urllib.error.HTTPError):
        return e.code >= 500
    if isinstance(e, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict) and "ResponseMetadata" in response:
        return int(response["ResponseMetadata"].get("HTTPStatusCode", 0)) >= 500
    return type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError")


def _split_s3(url: str) -> tuple[str, str]:
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise OpenError(f"{url}: an S3 location must be s3://bucket/key")
    return bucket, key


def _range_header(start: int, end: int | None) -> dict[str, str]:
    """``Range: bytes=start-`` (or ``start-(end-1)``); none for a whole object."""
    if end is not None:
        return {"Range": f"bytes={start}-{end - 1}"}
    return {"Range": f"bytes={start}-"} if start else {}


def _open_once(url: str, start: int, end: int | None = None) -> tuple[IO[bytes], int | None]:
    """(stream positioned at ``start``, total object size if known); remote reads stop at ``end``."""
    if url.startswith(("http://", "https://")):
        req = urllib.request.Request(url, headers=_range_header(start, end))
        f = urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S)  # noqa: S310 (user-given URL)
        total = _total_size(f.headers.get("Content-Range"), f.headers.get("Content-Length"), f.status == 206)
        if start and f.status != 206:  # the server ignored the Range header: skip by reading
            _discard(f, start)
        return f, total
    if url.startswith("s3://"):
        bucket, key = _split_s3(url)
        r = _s3_client().get_object(Bucket=bucket, Key=key, **_range_header(start, end))
        return r["Body"], _total_size(r.get("ContentRange"), r.get("ContentLength"), "ContentRange" in r)
    f = open(url, "rb")
    f.seek(start)
    return f, os.fstat(f.fileno()).st_size


def _total_size(content_range: str | None, content_length, partial: bool) -> int | None:
    """Object size from ``Content-Range: bytes a-b/total`` (partial) or ``Content-Length`` (whole)."""
    if partial and content_range and "/" in content_range:
        tail = content_range.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    if not partial and content_length is not None:
        return int(content_length)
    return None


def _discard(f: IO[bytes], n: int) -> None:
    while n > 0:
        chunk = f.read(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"ended {n} bytes before the requested start")
        n -= len(chunk)


def open_stream(url: str, retries: int = RETRIES) -> IO[bytes]:
    """Open ``url`` for sequential binary reading (a seekable file for local paths).

    Remote opens are retried ``retries`` times with backoff on transient errors (connection,
    timeout, 5xx); a 4xx or a missing local file fails at once.
    """
    return open_range(url, 0, retries)[0]


def open_range(url: str, start: int, retries: int = RETRIES, end: int | None = None) -> tuple[IO[bytes], int | None]:
    """Like :func:`open_stream` but from byte ``start`` (seek / HTTP or S3 range request, up to
    ``end`` when given: a remote stream then ends there); also returns the object's total size
    when the server tells it."""
    if end is not None and end <= start:
        raise OpenError(f"{url}: empty byte range {start}-{end}")
    attempt = 0
    while True:
        try:
            return _open_once(url, start, end)
        except OpenError:
            raise
        except Exception as e:
            if attempt < retries and is_remote(url) and _transient(e):
                time.sleep(RETRY_BACKOFF_S * 2**attempt)
                attempt += 1
                continue
            raise _open_error(url, e) from None


def _open_error(url: str, e: Exception) -> OpenError:
    """The one-line error for a failed open, naming the URL."""
    if isinstance(e, FileNotFoundError):
        return OpenError(f"{url}: no such file")
    if isinstance(e, urllib.error.HTTPError):
        return OpenError(f"{url}: HTTP {e.code} {e.reason}")
    return OpenError(f"{url}: cannot open ({type(e).__name__}: {e})")  # URLError, botocore, permissions


def read_bytes(url: str) -> bytes:
    """Read the whole object at ``url``."""
    f = open_stream(url)
    try:
        return f.read()
    except Exception as e:
        raise OpenError(f"{url}: read failed ({type(e).__name__}: {e})") from None
    finally:
        f.close()
