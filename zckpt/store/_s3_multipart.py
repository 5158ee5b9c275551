"""One S3 multipart upload of a blob, from the buffers it is made of: parts sent with at most
``max_concurrency`` (and, for a stream's parts that hold their frames, at most a budget of
bytes) in flight, each confirmed by its ETag (or CRC32) as it settles, then completed and the
completed object's ETag (or composite CRC32) checked. :class:`~zckpt.store._s3.S3Backend`
cuts the parts and makes the requests."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import hashlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from zckpt.store._s3_checks import composite_crc32, crc32_b64, crc32_of, etag_of, opaque_etag

if TYPE_CHECKING:
    from zckpt.store._s3 import S3Backend

__all__ = ["multipart"]


def multipart(
    b: S3Backend,
    path: str,
    parts: Iterator[list[memoryview]],
    first: Callable[[], list[memoryview]] | None,
    hasher: Any = None,
    budget: int | None = None,
) -> str:
    """Upload ``parts`` as parts 1, 2, ... (from 2 when ``first`` gives part 1 at the end),
    at most ``max_concurrency`` in flight and, with ``budget``, at most that many bytes
    (always one); complete; return the checked ETag. Each part's MD5 (and ``hasher``'s
    update, in part order) is computed while it is on its way."""
    bucket, key = b._split(path)

    def create() -> dict[str, Any]:
        extra = {"ChecksumAlgorithm": "CRC32", "ChecksumType": "COMPOSITE"}
        made: dict[str, Any] = b._run(
            b._call(
                path,
                "create_multipart_upload",
                Bucket=bucket,
                Key=key,
                **(extra if b.checksums else {}),
            )
        )
        return made

    mpu = create()
    if not b.checksums and opaque_etag(mpu):  # SSE-KMS/SSE-C: parts' ETags are no MD5s
        b.checksums = True
        with contextlib.suppress(Exception):
            b._abort(path, bucket, key, mpu["UploadId"])
        mpu = create()
    crcs = b.checksums  # this upload's parts carry CRC32s, checked instead of ETags
    upload_id = mpu["UploadId"]
    done: dict[int, tuple[bytes, int, str]] = {}  # part: (MD5, CRC32, the store's ETag)
    flight: collections.deque[
        tuple[int, Any, int, int, concurrent.futures.Future[dict[str, Any]]]
    ] = collections.deque()
    flying = [0]  # bytes in flight
    room = sys.maxsize if budget is None else budget

    def settle(limit: int, adding: int = 0) -> None:
        while flight and (len(flight) > limit or flying[0] + adding > room):
            number, md5, crc, nbytes, fut = flight.popleft()
            flying[0] -= nbytes
            try:
                etag = b._check_put(fut.result(), crc if crcs else None, md5)
            except OSError as e:
                raise type(e)(f"part {number}: {e}") from None
            done[number] = (b"" if crcs else md5.digest(), crc, etag)

    def send(number: int, views: list[memoryview]) -> None:
        nbytes = sum(v.nbytes for v in views)
        settle(b.max_concurrency - 1, nbytes)
        crc = crc32_of(views) if crcs else 0  # in the header: known before sending
        sent = crc if crcs else None
        coro = b._part(path, bucket, key, upload_id, number, views, crc=sent)
        fut = asyncio.run_coroutine_threadsafe(coro, b.fs.loop)
        md5 = None if crcs else hashlib.md5(usedforsecurity=False)
        for v in views:
            if md5 is not None:
                md5.update(v)
            if hasher is not None:
                hasher.update(v)
        flight.append((number, md5, crc, nbytes, fut))
        flying[0] += nbytes

    try:
        number = 1 if first is None else 2
        for views in parts:
            send(number, views)
            number += 1
        if first is not None:
            send(1, first())
        settle(0)
        numbers = sorted(done)
        listing: list[dict[str, Any]] = [
            {"PartNumber": n, "ETag": f'"{done[n][2]}"', "ChecksumCRC32": crc32_b64(done[n][1])}
            if crcs
            else {"PartNumber": n, "ETag": f'"{done[n][0].hex()}"'}
            for n in numbers
        ]
        r = b._run(
            b._call(
                path,
                "complete_multipart_upload",
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": listing},
            )
        )
    except BaseException:
        for *_, fut in flight:
            fut.cancel()
        for *_, fut in flight:
            with contextlib.suppress(BaseException):  # the failure raised below is the one
                fut.result()
        with contextlib.suppress(Exception):  # best effort: `zckpt clean` aborts the rest
            b._abort(path, bucket, key, upload_id)
        raise
    got = etag_of(r.get("ETag", ""))
    if crcs:
        want = composite_crc32([done[n][1] for n in numbers])
        said = r.get("ChecksumCRC32")
        if said != want:
            raise OSError(
                f"the store's CRC32 {said or '(none)'} for the completed upload is not {want}"
                ", the composite of the parts' CRC32s"
            )
        return got
    joined = b"".join(done[n][0] for n in numbers)
    want = f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(numbers)}"
    if got and got != want:
        raise OSError(f"the store's ETag {got} for the completed upload is not {want}")
    return got
