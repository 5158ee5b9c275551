"""The whole zckpt exception hierarchy.

Every error raised on purpose by zckpt derives from :class:`ZckptError`. Leaves also inherit
the builtin exception that callers already catch (``ValueError`` for malformed input,
``FileNotFoundError`` for missing files, ``OSError`` for storage failures), following zarr's
``NodeNotFoundError(BaseZarrError, FileNotFoundError)``. Messages name what is wrong: the file,
the tensor path, the rank and the byte offset, where they are known.

Exceptions keep their message in ``args`` only, so they pickle cleanly and can cross process
boundaries (spawned test workers, ``torch.distributed`` object collectives).

Example:
    >>> import zckpt
    >>> try:
    ...     zckpt.decode_shard(b"not a checkpoint")
    ... except zckpt.FormatError as e:
    ...     print(type(e).__name__, isinstance(e, ValueError))
    TruncatedError True
"""

from __future__ import annotations

__all__ = [
    "AllocationError",
    "ArgumentError",
    "CastError",
    "ChecksumError",
    "CoverageError",
    "FormatError",
    "SpecError",
    "StateError",
    "TruncatedError",
    "VersionError",
    "ZckptError",
]


class ZckptError(Exception):
    """Root of every error zckpt raises on purpose.

    Example:
        >>> issubclass(FormatError, ZckptError)
        True
    """


class StateError(ZckptError, TypeError):
    """A state (pytree) holds something zckpt cannot store, named by its key path.

    Example:
        >>> issubclass(StateError, TypeError)
        True
    """


class SpecError(ZckptError, ValueError):
    """A partition spec or plan is invalid (world size, stage, alignment, rank).

    Example:
        >>> issubclass(SpecError, ValueError)
        True
    """


class CoverageError(ZckptError, ValueError):
    """Shards do not cover a tensor exactly: a range is missing, duplicated or mismatched.

    Example:
        >>> issubclass(CoverageError, ValueError)
        True
    """


class FormatError(ZckptError, ValueError):
    """Bytes that are not a valid zckpt blob: bad magic, malformed index, bad bounds.

    Example:
        >>> issubclass(FormatError, ValueError)
        True
    """


class VersionError(FormatError):
    """A blob written by a newer, incompatible format version.

    Example:
        >>> issubclass(VersionError, FormatError)
        True
    """


class TruncatedError(FormatError):
    """A blob ends before the bytes its index promises.

    Example:
        >>> issubclass(TruncatedError, FormatError)
        True
    """


class ChecksumError(FormatError):
    """Stored bytes do not match their recorded checksum (a flipped bit, a torn write).

    Example:
        >>> issubclass(ChecksumError, FormatError)
        True
    """


class ArgumentError(ZckptError, ValueError):
    """An argument of a zckpt call is invalid (checked before anything touches the disk).

    Example:
        >>> issubclass(ArgumentError, ValueError)
        True
    """


class AllocationError(ZckptError, MemoryError):
    """Memory for a tensor a checkpoint declares could not be allocated (names the tensor and
    its size): the checkpoint is larger than this machine's memory, or its metadata lies.

    Example:
        >>> issubclass(AllocationError, MemoryError)
        True
    """


class CastError(ZckptError, ValueError):
    """Values asked for in a narrower dtype do not fit it: a finite value would become
    ``inf`` (``1e6`` as fp16), so the result would be silently wrong (names the tensor, how
    many values and the largest magnitude).

    Example:
        >>> issubclass(CastError, ValueError)
        True
    """
