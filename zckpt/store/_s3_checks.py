"""What confirms an S3 upload: ETags (the MD5 of the bytes sent, of a PUT and of each part; the
MD5 of the parts' MD5s, of a completed multipart upload) and, on buckets whose ETags are no
MD5s (SSE-KMS, SSE-C), the CRC32 the server validated on receipt and echoes (per PUT and part;
S3's COMPOSITE CRC32 of a completed upload). The values and their formats; the checks
themselves are :class:`~zckpt.store._s3.S3Backend`'s."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "OPAQUE_SSE",
    "OpaqueEtagError",
    "composite_crc32",
    "crc32_b64",
    "crc32_of",
    "etag_of",
    "opaque_etag",
]


def etag_of(text: str) -> str:
    """An ETag as compared: without its quotes, lower case.

    Example:
        >>> etag_of('"AB12"')
        'ab12'
    """
    return text.strip('"').lower()


# Server-side encryption whose ETags are not the MD5 of the object's bytes (SSE-S3's are).
OPAQUE_SSE = ("aws:kms", "aws:kms:dsse")


def opaque_etag(r: Mapping[str, Any]) -> str | None:
    """What makes a PUT's, UploadPart's or CompleteMultipartUpload's ETag no MD5 of the bytes:
    SSE-KMS (``aws:kms``, ``aws:kms:dsse``) or SSE-C, from the response; None for the others.

    Example:
        >>> opaque_etag({"ServerSideEncryption": "aws:kms"}), opaque_etag({"ETag": '"ab"'})
        ('SSE aws:kms', None)
        >>> opaque_etag({"SSECustomerAlgorithm": "AES256"})
        'SSE-C'
    """
    if r.get("SSECustomerAlgorithm"):
        return "SSE-C"
    sse = str(r.get("ServerSideEncryption") or "")
    return f"SSE {sse}" if sse in OPAQUE_SSE else None


def crc32_b64(crc: int) -> str:
    """A CRC32 as S3 writes it (``x-amz-checksum-crc32``: base64 of its 4 big-endian bytes).

    Example:
        >>> crc32_b64(zlib.crc32(b"hello"))
        'NhCmhg=='
    """
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def composite_crc32(parts: list[int]) -> str:
    """A multipart object's COMPOSITE CRC32 as S3 reports it: the CRC32 of the parts' CRC32s
    (4 bytes each, in part order), base64, then ``-`` and the part count.

    Example:
        >>> composite_crc32([zlib.crc32(b"a"), zlib.crc32(b"b")])[-2:]
        '-2'
    """
    raw = b"".join(c.to_bytes(4, "big") for c in parts)
    return f"{crc32_b64(zlib.crc32(raw))}-{len(parts)}"


def crc32_of(views: list[memoryview]) -> int:
    """The CRC32 of the bytes of ``views``, in order.

    Example:
        >>> crc32_of([memoryview(b"hel"), memoryview(b"lo")]) == zlib.crc32(b"hello")
        True
    """
    crc = 0
    for v in views:
        crc = zlib.crc32(v, crc)
    return crc


class OpaqueEtagError(OSError):
    """A store answered an upload sent without a checksum with an ETag that is not an MD5
    (SSE-KMS, SSE-C): the upload cannot be checked, and is sent again with one."""
