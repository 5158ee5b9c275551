"""S3 for :class:`~zckpt.store.FsspecStorage`: s3fs's own aiobotocore client, called directly.

s3fs's file objects buffer every write in Python and upload blocks one after another; its
``pipe`` needs the whole object as one ``bytes``. A blob here goes up straight from the buffers
it is made of (tensor memory, or compressed frames): a single PUT under ``multipart_threshold``
bytes, else a multipart upload whose parts (``part_size`` bytes, ``max_concurrency`` in flight)
are file-like views of those buffers, so nothing is copied into one big object and memory stays
bounded by the parts in flight. Every upload is counted only once the server has confirmed it:
each part's ETag (and a single PUT's) is the MD5 of the bytes sent, checked; the completed
object's ETag is the MD5 of the parts' MD5s, checked (S3 computes it from the MD5s of the parts
it stored, so it confirms every byte, and so the size: no HEAD follows; where an answer has no
ETag, or the bucket's ETags are no MD5s, a HEAD checks the size and ETag). A
compressed :class:`~zckpt.format.BlobStream` is streamed too: its frames fill parts 2, 3, ...
(of at most :data:`STREAM_PART` bytes, at most :data:`STREAM_FLIGHT` of them in flight) as they
are encoded, and part 1 (the head, known last, plus the first frames) is uploaded last; S3
assembles parts by number, whatever their order of arrival. The whole-file xxh3 the manifest
records then has to be computed in file order, head first: the object is
read back once in ranged GETs (bounded memory, twice the traffic for a large compressed blob;
blobs under two parts are held and sent as one PUT instead).

On a bucket that encrypts with SSE-KMS or SSE-C an ETag is not the MD5 of the bytes: where an
answer (or the filesystem's ``s3_additional_kwargs``) says so, uploads carry the CRC32 of their
bytes, which the server checks on receipt, and its echo (per PUT and part; the completed
upload's composite) is checked instead (``docs/layout.md``).

Lock objects use conditional requests: ``If-None-Match: *`` creates one only if it is absent,
``If-Match: <etag>`` replaces or deletes one only if it is still the one read.

Each byte uploaded is hashed by this module (MD5, for the ETag check; xxh3, for the manifest)
and by botocore, which by default adds a CRC32 request checksum to every PUT (in a trailer on
https, where the payload then goes unsigned; in a header on http) and, on http, signs the
payload's SHA-256. On an http endpoint the CRC32 is a third hash of bytes that the SHA-256 and
the ETag check already cover, so :func:`default_options` (used for ``s3://`` URLs that zckpt
opens) asks botocore for it only where an operation requires one. On https it stays: without
it botocore SHA-256-signs the payload instead, which costs more.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import hashlib
import itertools
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import xxhash

from zckpt.format import BlobStream
from zckpt.store._fsbackend import Head, PreconditionFailedError, UnsupportedError
from zckpt.store._parts import ViewsReader, flat_head, flat_tail, growing_parts
from zckpt.store._s3_checks import (
    OPAQUE_SSE,
    OpaqueEtagError,
    composite_crc32,
    crc32_b64,
    crc32_of,
    etag_of,
    opaque_etag,
)
from zckpt.store._s3_multipart import multipart
from zckpt.store._s3_options import default_options
from zckpt.store._transient import Retry, is_transient
from zckpt.store._write import windows

# default_options, composite_crc32 and crc32_b64 are named here too, where they were first.
__all__ = ["S3Backend", "composite_crc32", "crc32_b64", "default_options"]

T = TypeVar("T")

# S3's multipart rules: at most 10,000 parts; every part but the last at least 5 MiB.
_MAX_PARTS = 10_000
_MIN_PART = 5 << 20
# The read-back of a streamed blob: ranged GETs of at most this many bytes, this many in flight.
READ_BACK_STEP = 8 << 20
READ_BACK_FLIGHT = 4
# A compressed stream's parts hold their frames (raw parts are views of tensor memory): they
# are at most STREAM_PART bytes (doubling every 1,000 parts, so 10,000 parts reach ~8 TB of
# an object whose size is unknown until its last frame), and at most STREAM_FLIGHT bytes of
# them are in flight. With 50 MiB parts, 4 in flight and two held for part 1, a 1 GiB zstd
# save peaked 392 MiB above its state.
STREAM_PART = 8 << 20
STREAM_FLIGHT = 64 << 20


def _code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return ""
    code = response.get("Error", {}).get("Code", "")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(code or status or "")


def _total_size(content_range: object) -> int | None:
    """The object's size from a ranged GET's ``Content-Range`` (``bytes 0-9/1234``).

    Example:
        >>> _total_size("bytes 0-65535/16777664"), _total_size("bytes 0-9/*"), _total_size(None)
        (16777664, None, None)
    """
    if not isinstance(content_range, str):
        return None
    total = content_range.rpartition("/")[2].strip()
    return int(total) if total.isdigit() else None


def _server_age(r: dict[str, Any]) -> float | None:
    """Seconds since the object was last written, by the server's own clock (its Date header
    against the object's Last-Modified), so client clocks that disagree do not matter."""
    try:
        date = r["ResponseMetadata"]["HTTPHeaders"]["date"]
        now = email.utils.parsedate_to_datetime(date).timestamp()
        return max(0.0, now - float(r["LastModified"].timestamp()))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class S3Backend:
    """Object operations on an ``s3fs.S3FileSystem``'s client (paths are ``bucket/key``)."""

    def __init__(
        self,
        fs: Any,
        part_size: int,
        max_concurrency: int,
        retry: Retry,
        multipart_threshold: int | None = None,
    ) -> None:
        self.fs, self.retry = fs, retry
        self.part_size = max(_MIN_PART, part_size)
        self.multipart_threshold = (
            2 * self.part_size if multipart_threshold is None else multipart_threshold
        )
        self.max_concurrency = max(1, max_concurrency)
        # Uploads carry a CRC32 the server checks on receipt, and the check is its echo instead
        # of the ETag: from the start where the filesystem asks for SSE-KMS or SSE-C, else from
        # the first answer that says the bucket encrypts so.
        extra = dict(getattr(fs, "s3_additional_kwargs", None) or {})
        self.checksums = bool(extra.get("SSECustomerAlgorithm")) or (
            str(extra.get("ServerSideEncryption") or "") in OPAQUE_SSE
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
        return future.result()

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    async def _call(self, what: str, method: str, **kw: Any) -> Any:
        """One request, retried while its errors are transient, for at most the retry time."""

        async def once() -> Any:
            body = kw.get("Body")
            if body is not None and hasattr(body, "seek"):
                body.seek(0)  # a retry sends the whole body again, not what an attempt left
            await self.fs.set_session()
            client = await self.fs.get_s3(kw.get("Bucket"))
            call = getattr(client, method)
            if self.fs.s3_additional_kwargs or self.fs.req_kw:  # SSE-C's key, KMS, requester pays
                return await call(**self.fs._get_s3_method_kwargs(call, **kw))
            return await call(**kw)

        deadline = time.monotonic() + self.retry.total
        attempt = 0
        while True:
            try:
                return await once()
            except Exception as e:
                attempt += 1
                if not is_transient(e) or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(self.retry.delay(attempt, deadline))

    def _missing(self, e: BaseException) -> bool:
        return _code(e) in ("404", "NoSuchKey", "NotFound")

    # -- reads ------------------------------------------------------------------------------

    def head(self, path: str) -> Head | None:
        """Size, ETag and age of the object ``path``; None when there is none."""
        bucket, key = self._split(path)
        if not key:
            return None
        try:
            r = self._run(self._call(path, "head_object", Bucket=bucket, Key=key))
        except Exception as e:
            if self._missing(e):
                return None
            raise
        return Head(int(r["ContentLength"]), etag_of(r.get("ETag", "")), _server_age(r))

    def get(self, path: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` (fewer at the end); FileNotFoundError if none."""
        return self._run(self._get(path, offset, length))

    async def _get(self, path: str, offset: int, length: int) -> bytes:
        data, _ = await self._get_sized(path, offset, length)
        return data

    def get_sized(self, path: str, offset: int, length: int) -> tuple[bytes, int | None]:
        """:meth:`get`, and the object's whole size as the GET's ``Content-Range`` says it
        (None where it says none)."""
        return self._run(self._get_sized(path, offset, length))

    async def _get_sized(self, path: str, offset: int, length: int) -> tuple[bytes, int | None]:
        bucket, key = self._split(path)
        if length <= 0:
            return b"", None
        try:
            r = await self._call(
                path,
                "get_object",
                Bucket=bucket,
                Key=key,
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            async with r["Body"] as body:
                data: bytes = await body.read()
        except Exception as e:
            if self._missing(e):
                raise FileNotFoundError(path) from e
            if _code(e) in ("InvalidRange", "416"):
                return b"", None
            raise
        return data, _total_size(r.get("ContentRange"))

    def get_small(self, path: str) -> tuple[bytes, Head] | None:
        """A small object whole, with its ETag and age; None when there is none."""
        bucket, key = self._split(path)

        async def go() -> tuple[bytes, Head]:
            r = await self._call(path, "get_object", Bucket=bucket, Key=key)
            async with r["Body"] as body:
                data = await body.read()
            return data, Head(len(data), etag_of(r.get("ETag", "")), _server_age(r))

        try:
            return self._run(go())
        except Exception as e:
            if self._missing(e):
                return None
            raise

    def is_prefix(self, path: str) -> bool:
        """Whether any object lies under ``path/`` (a "directory")."""
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        r = self._run(self._call(path, "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1))
        return bool(r.get("KeyCount", len(r.get("Contents", []))))

    def _list(self, path: str, delimiter: bool) -> list[dict[str, Any]]:
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""

        async def go() -> list[dict[str, Any]]:
            pages: list[dict[str, Any]] = []
            token: str | None = None
            while True:
                kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
                if delimiter:
                    kw["Delimiter"] = "/"
                if token:
                    kw["ContinuationToken"] = token
                r = await self._call(path, "list_objects_v2", **kw)
                pages.append(r)
                token = r.get("NextContinuationToken")
                if not r.get("IsTruncated") or not token:
                    return pages

        return self._run(go())

    def files_under(self, path: str) -> list[tuple[str, Head]]:
        """Every object under ``path/`` (its name relative to ``path``, size and ETag), from
        one listing: a thousand objects per request."""
        _, key = self._split(path)
        skip = len(key.rstrip("/") + "/") if key else 0
        return [
            (o["Key"][skip:], Head(int(o["Size"]), etag_of(o.get("ETag", "")), None))
            for page in self._list(path, delimiter=False)
            for o in page.get("Contents", [])
            if len(o["Key"]) > skip
        ]

    def listdir(self, path: str) -> list[str]:
        """Names of the objects and "directories" right under ``path``."""
        _, key = self._split(path)
        skip = len(key.rstrip("/") + "/") if key else 0
        names: set[str] = set()
        for page in self._list(path, delimiter=True):
            names.update(o["Key"][skip:] for o in page.get("Contents", []))
            names.update(p["Prefix"][skip:].rstrip("/") for p in page.get("CommonPrefixes", []))
        names.discard("")
        return sorted(names)

    # -- writes -----------------------------------------------------------------------------

    def delete(self, path: str, if_match: str | None = None) -> None:
        """Delete ``path`` (missing is fine); with ``if_match``, only if its ETag still is that
        one (:class:`PreconditionFailedError` otherwise)."""
        bucket, key = self._split(path)
        kw: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if if_match is not None:
            kw["IfMatch"] = f'"{if_match}"'
        try:
            self._run(self._call(path, "delete_object", **kw))
        except Exception as e:
            if self._missing(e):
                return
            if _code(e) in ("PreconditionFailed", "412"):
                raise PreconditionFailedError(path) from e
            if if_match is not None and _code(e) in ("NotImplemented", "501"):
                raise UnsupportedError(path) from e
            raise

    def rmtree(self, path: str) -> None:
        """Delete every object under ``path/``, a thousand per request."""
        bucket, _ = self._split(path)
        keys = [
            o["Key"] for page in self._list(path, delimiter=False) for o in page.get("Contents", [])
        ]
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            self._run(self._call(path, "delete_objects", Bucket=bucket, Delete=batch))

    def put_small(
        self, path: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """One PUT of ``data``, confirmed by its ETag; returns the ETag. ``if_absent``:
        ``If-None-Match: *``; ``if_match``: ``If-Match``; a failed condition raises
        :class:`PreconditionFailedError`, a server without them :class:`UnsupportedError`."""
        cond: dict[str, str] = {}
        if if_absent:
            cond["IfNoneMatch"] = "*"
        if if_match is not None:
            cond["IfMatch"] = f'"{if_match}"'
        views = [memoryview(data)]
        try:
            crc = crc32_of(views) if self.checksums else None
            r = self._run(self._put(path, views, cond, crc))
            try:
                return self._check_put(r, crc, hashlib.md5(data, usedforsecurity=False))
            except OpaqueEtagError:
                # Our own object, unchecked: replaced by one with a CRC32, if still ours.
                crc = crc32_of(views)
                r = self._run(self._put(path, views, {"IfMatch": r.get("ETag", "")}, crc))
                return self._check_put(r, crc, None)
        except Exception as e:
            if _code(e) in ("PreconditionFailed", "412"):
                raise PreconditionFailedError(path) from e
            if cond and _code(e) in ("NotImplemented", "501"):
                raise UnsupportedError(path) from e
            raise

    async def _put(
        self, path: str, views: list[memoryview], cond: dict[str, str], crc: int | None = None
    ) -> dict[str, Any]:
        bucket, key = self._split(path)
        if crc is not None:
            cond = {**cond, "ChecksumCRC32": crc32_b64(crc)}
        r: dict[str, Any] = await self._call(
            path, "put_object", Bucket=bucket, Key=key, Body=ViewsReader(views), **cond
        )
        return r

    def _check_put(self, r: Mapping[str, Any], crc: int | None, md5: Any) -> str:
        """The ETag of a PUT's (or part's) answer ``r``, once it confirms the bytes sent: its
        ETag is their MD5 (``md5``, a hashlib object), or, sent with the CRC32 ``crc``, the
        store echoes that CRC32 (it checked the bytes against it on receipt). An opaque ETag
        (SSE-KMS, SSE-C) of an upload sent without a CRC32 raises :class:`OpaqueEtagError`,
        and from then on every upload carries one."""
        etag = etag_of(r.get("ETag", ""))
        opaque = opaque_etag(r)
        if crc is not None:
            got, want = r.get("ChecksumCRC32"), crc32_b64(crc)
            if got != want:
                why = f"encrypts with {opaque}: its ETag is no MD5, and " if opaque else ""
                raise OSError(
                    f"the store {why}its CRC32 {got or '(none)'} is not the CRC32 {want} "
                    "of the bytes sent"
                )
            return etag
        if opaque is not None:
            self.checksums = True
            raise OpaqueEtagError(f"the store encrypts with {opaque}: its ETag is no MD5")
        want_md5 = md5.hexdigest() if md5 is not None else None
        if etag and want_md5 is not None and etag != want_md5:
            raise OSError(f"the store's ETag {etag} is not the MD5 {want_md5} of the bytes sent")
        return etag

    def put(self, path: str, buffers: Iterable[memoryview | bytes]) -> tuple[int, int]:
        """Upload a blob; return (size, xxh3_64) once the store has confirmed it."""
        if isinstance(buffers, BlobStream):
            size, digest, etag = self._put_stream(path, buffers)
        else:
            views = [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]
            hasher = xxhash.xxh3_64()
            size = sum(v.nbytes for v in views)
            if size < self.multipart_threshold:
                etag = self._put_hashing(path, views, hasher)
            else:
                try:
                    parts = iter(windows(views, self._part_for(size), max_buffers=sys.maxsize))
                    etag = self._multipart(path, parts, None, hasher)
                except OpaqueEtagError:  # the parts' answers, not the creation's, said SSE
                    hasher = xxhash.xxh3_64()
                    parts = iter(windows(views, self._part_for(size), max_buffers=sys.maxsize))
                    etag = self._multipart(path, parts, None, hasher)
            digest = hasher.intdigest()
        if not etag or self.checksums:
            # An ETag that is the MD5 of the bytes sent (of the parts' MD5s) confirmed them all,
            # so their count too. With no ETag, or on a bucket whose ETags are no MD5s (a
            # 32-bit CRC32 checked instead), the HEAD checks the size and the ETag as well.
            self._confirm(path, size, etag)
        return size, digest

    def _put_hashing(self, path: str, views: list[memoryview], hasher: Any) -> str:
        """One PUT of ``views``; their MD5 (checked against the ETag) and ``hasher``'s update
        are computed here while the bytes are on their way. Where ETags are no MD5s (SSE-KMS,
        SSE-C) the PUT carries their CRC32 instead, computed before it is sent, and its echo is
        checked (an answer that first shows such a bucket makes the PUT go again, so)."""
        if self.checksums:
            for v in views:
                hasher.update(v)
            crc = crc32_of(views)
            return self._check_put(self._run(self._put(path, views, {}, crc)), crc, None)
        fut = asyncio.run_coroutine_threadsafe(self._put(path, views, {}), self.fs.loop)
        try:
            md5 = hashlib.md5(usedforsecurity=False)
            for v in views:
                md5.update(v)
                hasher.update(v)
        finally:
            r = fut.result()
        try:
            return self._check_put(r, None, md5)
        except OpaqueEtagError:
            crc = crc32_of(views)
            return self._check_put(self._run(self._put(path, views, {}, crc)), crc, None)

    def _part_for(self, size: int) -> int:
        """The part size for ``size`` bytes: ``part_size``, or more to stay in 10,000 parts."""
        return max(self.part_size, -(-size // _MAX_PARTS))

    def _confirm(self, path: str, size: int, etag: str) -> None:
        head = self.head(path)
        if head is None:
            raise OSError("the store does not show the object just uploaded")
        if head.size != size:
            raise OSError(f"the store holds {head.size} bytes, {size} were uploaded")
        if etag and head.etag and head.etag != etag:
            raise OSError(f"the store's ETag is {head.etag}, the upload's was {etag}")

    def _multipart(
        self,
        path: str,
        parts: Iterator[list[memoryview]],
        first: Callable[[], list[memoryview]] | None,
        hasher: Any = None,
        budget: int | None = None,
    ) -> str:
        """One multipart upload of ``parts`` (:func:`~zckpt.store._s3_multipart.multipart`)."""
        return multipart(self, path, parts, first, hasher, budget)

    def _abort(self, path: str, bucket: str, key: str, upload_id: str) -> None:
        self._run(
            self._call(path, "abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
        )

    async def _part(
        self,
        path: str,
        bucket: str,
        key: str,
        upload_id: str,
        number: int,
        views: list[memoryview],
        crc: int | None = None,
    ) -> dict[str, Any]:
        extra = {} if crc is None else {"ChecksumCRC32": crc32_b64(crc)}
        r: dict[str, Any] = await self._call(
            path,
            "upload_part",
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=ViewsReader(views),
            **extra,
        )
        return r

    def _put_stream(self, path: str, blob: BlobStream) -> tuple[int, int, str]:
        """A compressed blob as it is encoded: frames into parts 2, 3, ...; part 1 (the head and
        the first frames) last. Parts are at most :data:`STREAM_PART` bytes (growing past
        1,000 parts), at most :data:`STREAM_FLIGHT` bytes of them in flight: the frames held
        stay bounded whatever ``part_size``. Blobs under two parts are sent as one PUT."""
        frames = iter(blob.frames())
        part = max(_MIN_PART, min(self.part_size, STREAM_PART))
        room = max(0, part - blob.data_offset)  # frame bytes that go into part 1
        held: list[memoryview] = []
        held_bytes = 0
        for buf in frames:  # until part 1 is full and part 2 has begun
            v = memoryview(buf).cast("B")
            held.append(v)
            held_bytes += v.nbytes
            if held_bytes >= room + part:
                break
        else:  # small: the whole blob is in hand
            views = [memoryview(blob.head()), *held]
            hasher = xxhash.xxh3_64()
            etag = self._put_hashing(path, views, hasher)
            return sum(v.nbytes for v in views), hasher.intdigest(), etag
        first_frames = flat_head(held, room)
        parts = growing_parts(itertools.chain(flat_tail(held, room), frames), part)
        held = []
        etag = self._multipart(
            path,
            parts,
            lambda: [memoryview(blob.head()), *first_frames],
            budget=max(part, STREAM_FLIGHT),
        )
        size = blob.size
        return size, self._hash_back(path, size), etag

    def _hash_back(self, path: str, size: int) -> int:
        """xxh3_64 of the object as stored, read back in file order in ranged GETs of at most
        :data:`READ_BACK_STEP` bytes, :data:`READ_BACK_FLIGHT` in flight: the bytes held stay
        bounded whatever the part size (8 GETs of 50 MiB parts held 400 MiB: a 1 GiB zstd save
        peaked 510 MiB above its state)."""
        hasher = xxhash.xxh3_64()
        step = min(self.part_size, READ_BACK_STEP)
        starts = list(range(0, size, step))
        flight: collections.deque[concurrent.futures.Future[bytes]] = collections.deque()
        for at in starts:
            coro = self._get(path, at, min(step, size - at))
            flight.append(asyncio.run_coroutine_threadsafe(coro, self.fs.loop))
            if len(flight) >= min(self.max_concurrency, READ_BACK_FLIGHT):
                hasher.update(flight.popleft().result())
        while flight:
            hasher.update(flight.popleft().result())
        return hasher.intdigest()

    def uploads(self, path: str) -> list[tuple[str, str]]:
        """(name relative to ``path``, upload id) of every unfinished multipart upload under it."""
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""

        async def go() -> list[tuple[str, str]]:
            found: list[tuple[str, str]] = []
            marker: dict[str, str] = {}
            while True:
                r = await self._call(
                    path, "list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker
                )
                found += [(u["Key"][len(prefix) :], u["UploadId"]) for u in r.get("Uploads", [])]
                if not r.get("IsTruncated"):
                    return found
                marker = {
                    "KeyMarker": r.get("NextKeyMarker", ""),
                    "UploadIdMarker": r.get("NextUploadIdMarker", ""),
                }

        return self._run(go())

    def abort_uploads(self, path: str) -> list[str]:
        """Abort every unfinished multipart upload under ``path/`` (a killed save's); return
        their names relative to ``path``."""
        bucket, key = self._split(path)
        prefix = key.rstrip("/") + "/" if key else ""
        aborted = []
        for name, upload_id in self.uploads(path):
            self._run(
                self._call(
                    path,
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=prefix + name,
                    UploadId=upload_id,
                )
            )
            aborted.append(name)
        return aborted
