"""The integrity checks of a ``torch.save`` zip: its layout, and every record against its CRC-32.

:func:`_record_offsets` checks the zip's layout before anything reads a record (one record per
name, each local header where the central directory says and agreeing with it, records
disjoint): torch's loads check none of it and read another record's or a duplicate's bytes
silently. :func:`record_problems` reads every record whole against the CRC-32 its central
directory records, the only checksum a DeepSpeed checkpoint has, which torch's loads never
check; :func:`records_problems` does it for many files side by side (``zckpt verify``) and
:func:`require_intact` refuses a damaged one (``zckpt consolidate``, ``convert_deepspeed``). The
fast load (``_fastload.py: load_refs``) uses the layout check to locate each record's bytes.
They live apart from the unpickling because they are about the container, not the pickle: the
CRC checks read bytes and need no unpickler, allow-list or stand-in.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Sequence

from zckpt.interop._window import FileWindow

__all__ = ["record_problems", "records_problems", "require_intact"]


class _DamagedError(Exception):
    """The file is a torch.save zip that no loader may read as it is (torch's ``mmap=True`` load
    would give wrong values without an error): a zckpt error, not torch's fallback."""


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)
_DESCRIPTOR = b"PK\x07\x08"
_ZIP64_SIZE = 0xFFFFFFFF
_DESC32, _DESC64 = struct.Struct("<III"), struct.Struct("<IQQ")


def _record_offsets(
    fd: int, infos: list[zipfile.ZipInfo], start_dir: int, base: int = 0
) -> dict[str, int]:
    """Where each record's bytes begin in the file (after its local header; the zip starts at
    byte ``base`` of it, as a DCP item does inside its ``.distcp`` file), by name, the zip's layout
    checked first: one record per name; each record's local header where the central directory
    puts it, naming that record, and agreeing with it (CRC-32 and sizes, in the header or in
    the data descriptor after the bytes); the records, descriptors included, disjoint and before
    the central directory. torch's loads (``mmap`` or not) check none of this and read a record
    another one's bytes, a shifted range or a duplicate's copy without an error; so a file
    failing it is damaged (:class:`_DamagedError`, naming the record and the byte offset), not
    left to torch's load.
    """
    out: dict[str, int] = {}
    spans: list[tuple[int, int, str]] = []
    for info in infos:
        name, at = info.filename, int(info.header_offset)
        if name in out:
            raise _DamagedError(f"two zip records are named {name} (which one is the file's?)")
        head = os.pread(fd, _LOCAL.size, base + at)
        if len(head) != _LOCAL.size or head[:4] != b"PK\x03\x04":
            raise _DamagedError(f"record {name}: no zip local header at byte {at}")
        _sig, _v, flags, _method, _t, _d, crc, csize, usize, n, m = _LOCAL.unpack(head)
        raw = os.pread(fd, n, base + at + _LOCAL.size)
        local = raw.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
        if local != info.orig_filename:
            raise _DamagedError(f"record {name}: the local header at byte {at} names {local!r}")
        data = at + _LOCAL.size + n + m
        end = data + int(info.compress_size)
        want = (info.CRC, info.compress_size, info.file_size)
        if flags & 0x08:  # CRC-32 and sizes in a data descriptor after the bytes (zip64: 8-byte)
            desc = os.pread(fd, 24, base + end)
            skip = 4 if desc[:4] == _DESCRIPTOR else 0
            for form in (_DESC32, _DESC64):
                if len(desc) >= skip + form.size and form.unpack_from(desc, skip) == want:
                    end += skip + form.size
                    break
            else:
                raise _DamagedError(
                    f"record {name}: its data descriptor at byte {end} disagrees with the "
                    "central directory (CRC-32, sizes)"
                )
        elif crc != info.CRC or (_ZIP64_SIZE not in (csize, usize) and (csize, usize) != want[1:]):
            raise _DamagedError(
                f"record {name}: the local header at byte {at} disagrees with the central "
                "directory (CRC-32, sizes)"
            )
        out[name] = base + data
        spans.append((at, end, name))
    spans.sort()
    for (a, end, name), nxt in zip(spans, [*spans[1:], (start_dir, 0, "the central directory")]):
        if end > nxt[0]:
            raise _DamagedError(
                f"record {name} (bytes {a} to {end}) overlaps {nxt[2]} at byte {nxt[0]}"
            )
    return out


_CRC_PIECE = 1 << 20  # read into one buffer and hashed while in the CPU cache


def record_problems(
    path: str,
    on_bytes: Callable[[int], None] | None = None,
    window: tuple[int, int] | None = None,
) -> list[str]:
    """Every record of the ``torch.save`` zip ``path`` read whole and its CRC-32 compared with
    the one its central directory records (after the layout check of ``_record_offsets``): the
    only checksum a DeepSpeed checkpoint has, and one that torch's loads never check (a flipped
    bit in a tensor's bytes loads as a wrong value). Each problem names the file, the record and
    the byte range; ``[]`` when every record matches. A file that is not a zip (torch's legacy
    format) has no CRC to check: ``[]``. ``on_bytes`` is told each piece's size as it is read.
    ``window``: ``(offset, length)``, the zip is those bytes of ``path`` (a DCP item).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> p = tempfile.mkdtemp() + "/x.pt"
        >>> torch.save({"w": torch.arange(3.0)}, p)
        >>> record_problems(p)
        []
        >>> raw = bytearray(Path(p).read_bytes())
        >>> raw[raw.index(torch.arange(3.0).numpy().tobytes()) + 5] ^= 1
        >>> _ = Path(p).write_bytes(raw)
        >>> print(record_problems(p)[0])  # doctest: +ELLIPSIS
        /...x.pt: record x/data/0 (bytes ... to ...): CRC-32 0x... where the zip records 0x...
    """
    import zlib

    try:
        with open(path, "rb") as f:
            base = 0 if window is None else window[0]
            if os.pread(f.fileno(), 4, base) != b"PK\x03\x04":
                return []
            try:
                z = zipfile.ZipFile(f if window is None else FileWindow(f.fileno(), *window))
            except zipfile.BadZipFile as e:
                return [f"{path}: not a readable zip ({e})"]
            with z:
                infos = z.infolist()
                try:
                    offsets = _record_offsets(f.fileno(), infos, int(z.start_dir), base)
                except _DamagedError as e:
                    return [f"{path}: {e}"]
                problems = []
                view = memoryview(bytearray(_CRC_PIECE))
                for info in infos:
                    if info.compress_type != zipfile.ZIP_STORED:
                        try:  # zipfile inflates it and checks the CRC-32 at its end
                            with z.open(info) as r:
                                while piece := r.read(_CRC_PIECE):
                                    if on_bytes is not None:
                                        on_bytes(len(piece))
                        except (zipfile.BadZipFile, OSError, EOFError) as e:
                            problems.append(f"{path}: record {info.filename}: {e}")
                        continue
                    start, left, crc = offsets[info.filename], int(info.compress_size), 0
                    at = start
                    while left:
                        got = os.preadv(f.fileno(), [view[: min(left, _CRC_PIECE)]], at)
                        if not got:
                            break
                        crc = zlib.crc32(view[:got], crc)
                        at, left = at + got, left - got
                        if on_bytes is not None:
                            on_bytes(got)
                    if left:
                        problems.append(
                            f"{path}: record {info.filename} (bytes {start} to "
                            f"{start + info.compress_size}): the file ends at byte {at}"
                        )
                    elif crc != info.CRC:
                        problems.append(
                            f"{path}: record {info.filename} (bytes {start} to {at}): CRC-32 "
                            f"{crc:#010x} where the zip records {info.CRC:#010x}"
                        )
                return problems
    except OSError as e:
        return [f"{path}: {e.strerror or e}"]


def records_problems(
    paths: Sequence[str], on_bytes: Callable[[int], None] | None = None
) -> list[str]:
    """:func:`record_problems` of every file in ``paths``, files read side by side on
    ``decode_threads()`` threads; the problems in ``paths``' order.

    Example:
        >>> import tempfile, torch
        >>> d = tempfile.mkdtemp()
        >>> for n in "ab":
        ...     torch.save({"w": torch.ones(2)}, f"{d}/{n}.pt")
        >>> records_problems([f"{d}/a.pt", f"{d}/b.pt"])
        []
    """
    from concurrent.futures import ThreadPoolExecutor

    from zckpt.format._decode import decode_threads

    threads = max(1, min(decode_threads(), len(paths)))
    if threads == 1:
        return [p for path in paths for p in record_problems(path, on_bytes)]
    with ThreadPoolExecutor(threads, thread_name_prefix="zckpt-crc") as pool:
        found = list(pool.map(lambda path: record_problems(path, on_bytes), paths))
    return [p for problems in found for p in problems]


def require_intact(paths: Sequence[str]) -> None:
    """Raise unless every zip record of every file in ``paths`` matches its CRC-32
    (:func:`records_problems`), before a conversion or an export reads them: torch's loads
    would read a flipped bit as a value.

    Raises:
        DeepSpeedFormatError: naming the first problems (file, record, byte range).

    Example:
        >>> require_intact([])
    """
    problems = records_problems(paths)
    if problems:
        from zckpt.interop._unpickle import DeepSpeedFormatError

        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DeepSpeedFormatError(
            "damaged checkpoint files, nothing was written: " + "; ".join(problems[:3]) + more
        )
