"""Unpacking an uploaded expert (.tar.gz or .zip of a PEFT directory) without trusting anything in the archive.

Refused, each with its own message: names that are absolute or climb out (`..`), links, device files and other
non-regular entries, pickled weights (safetensors only), file kinds an adapter does not have, duplicate or
nested names, more entries than allowed, and archives that unpack to more bytes than allowed. The byte limit is
counted on the bytes actually written while extracting, not read from headers, so a decompression bomb stops
at the limit however its headers lie.
"""

from __future__ import annotations

import gzip
import io
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from adapters.errors import PoolError

PICKLED = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ALLOWED = (".json", ".safetensors", ".md", ".txt")
_CHUNK = 1 << 16


def _shown(name: str) -> str:
    """An entry's name as an error message quotes it: cut short (a name can be megabytes long)."""
    return repr(name if len(name) <= 120 else name[:120] + "...")


class ArchiveRefused(PoolError):
    status = 400
    code = "invalid_archive"


class ArchiveTooLarge(PoolError):
    status = 413
    code = "archive_too_large"


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int
    max_unpacked_bytes: int


def _member_name(raw: str) -> str:
    """The file name an entry may have: one plain component, optionally under one top-level directory."""
    if not raw or raw.startswith(("/", "\\")) or (len(raw) > 1 and raw[1] == ":") or "\\" in raw:
        raise ArchiveRefused(f"archive entry {_shown(raw)} has an absolute or non-portable name", "file")
    parts = [p for p in PurePosixPath(raw).parts if p != "."]
    if any(p == ".." for p in parts):
        raise ArchiveRefused(f"archive entry {_shown(raw)} climbs out of the archive ('..')", "file")
    if not parts:
        raise ArchiveRefused(f"archive entry {_shown(raw)} has no name", "file")
    return "/".join(parts)


def _check_file_name(name: str) -> None:
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLED:
        raise ArchiveRefused(f"{_shown(name)}: pickled weights ({suffix}) are refused; ship "
                             "adapter_model.safetensors", "file")
    if suffix not in ALLOWED:
        raise ArchiveRefused(f"{_shown(name)}: only {', '.join(ALLOWED)} files belong in an expert archive", "file")


class _Writer:
    """Writes the archive's files into `dest`, counting entries and every byte written against the limits."""

    def __init__(self, dest: Path, limits: ArchiveLimits):
        self.dest, self.limits = dest, limits
        self.entries = 0
        self.written = 0
        self.names: set[str] = set()
        self.top: set[str] = set()

    def count(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveRefused(f"the archive has more than {self.limits.max_entries} entries", "file")

    def directory(self, raw: str) -> None:
        name = _member_name(raw)
        if "/" in name:
            raise ArchiveRefused(f"archive entry {_shown(raw)}: an expert directory has no subdirectories", "file")
        self.top.add(name)

    def file(self, raw: str, source: IO[bytes]) -> None:
        name = _member_name(raw)
        parts = name.split("/")
        if len(parts) > 2:
            raise ArchiveRefused(f"archive entry {_shown(raw)}: an expert directory has no subdirectories", "file")
        _check_file_name(name)
        if len(parts) == 2:
            self.top.add(parts[0])
        key = parts[-1] if len(parts) == 1 else name
        if key in self.names:
            raise ArchiveRefused(f"archive entry {_shown(raw)} appears twice", "file")
        self.names.add(key)
        target = self.dest.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            while chunk := source.read(_CHUNK):
                self.written += len(chunk)
                if self.written > self.limits.max_unpacked_bytes:
                    raise ArchiveTooLarge(f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes "
                                          "(FLOCK_UPLOAD_MAX_UNPACKED_MB)", "file")
                out.write(chunk)

    def adapter_dir(self) -> Path:
        """The PEFT directory: the archive's root, or its one top-level directory."""
        flat = any("/" not in n for n in self.names)
        if flat and self.top:
            raise ArchiveRefused("the archive mixes files at its root with a directory; pack one PEFT directory",
                                 "file")
        if len(self.top) > 1:
            raise ArchiveRefused(f"the archive holds {len(self.top)} top-level directories; pack one PEFT directory",
                                 "file")
        return self.dest / next(iter(self.top)) if self.top else self.dest


class _Bounded(io.RawIOBase):
    """The decompressed stream, cut off past `limit` bytes: tarfile itself reads headers (a GNU long name, a pax
    header) of whatever size they claim into memory before any member reaches the writer."""

    def __init__(self, source: IO[bytes] | gzip.GzipFile, limit: int):
        self.source, self.limit, self.read_bytes = source, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.source.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise ArchiveTooLarge(f"the archive unpacks to more than {self.limit} bytes", "file")
        buffer[: len(data)] = data
        return len(data)


def _from_tar(fileobj: IO[bytes], writer: _Writer) -> None:
    # Streamed ("r|"): members are read once, in order, and nothing seeks back into the decompressed data, which
    # is bounded as a whole: the files' bytes plus a tar header and padding for every entry allowed.
    limit = writer.limits.max_unpacked_bytes + (writer.limits.max_entries + 2) * 2048 + 20480
    stream = _Bounded(gzip.GzipFile(fileobj=fileobj, mode="rb"), limit)
    with tarfile.open(fileobj=io.BufferedReader(stream, _CHUNK), mode="r|") as tar:
        for member in tar:
            writer.count()
            if member.issym() or member.islnk():
                raise ArchiveRefused(f"archive entry {_shown(member.name)} is a link; links are refused", "file")
            if member.isdir():
                writer.directory(member.name)
            elif member.isreg():
                source = tar.extractfile(member)
                assert source is not None
                writer.file(member.name, source)
            else:
                raise ArchiveRefused(f"archive entry {_shown(member.name)} is a device, FIFO or other special "
                                     "file", "file")


def _from_zip(fileobj: IO[bytes], writer: _Writer) -> None:
    with zipfile.ZipFile(fileobj) as archive:
        infos = archive.infolist()
        if len(infos) > writer.limits.max_entries:  # the central directory's count, before anything is read
            raise ArchiveRefused(f"the archive has more than {writer.limits.max_entries} entries", "file")
        for info in infos:
            writer.count()
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix file type recorded (a plain entry)
            if kind == stat.S_IFLNK:
                raise ArchiveRefused(f"archive entry {_shown(info.filename)} is a link; links are refused", "file")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveRefused(f"archive entry {_shown(info.filename)} is a device, FIFO or other special file",
                                     "file")
            if info.is_dir():
                writer.directory(info.filename)
            else:
                with archive.open(info) as source:
                    writer.file(info.filename, source)


@contextmanager
def _reading_errors() -> Iterator[None]:
    try:
        yield
    except PoolError:
        raise
    except OSError as exc:  # its strerror alone: the message names no path on the server
        raise ArchiveRefused(f"the archive is damaged or unreadable: {exc.strerror or type(exc).__name__}",
                             "file") from None
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, struct.error, EOFError, ValueError, RuntimeError,
            NotImplementedError) as exc:  # RuntimeError: an encrypted zip entry
        raise ArchiveRefused(f"the archive is damaged or unreadable: {str(exc)[:200]}", "file") from None


def unpack(fileobj: IO[bytes], dest: Path, limits: ArchiveLimits) -> Path:
    """Unpack a .tar.gz or .zip into the new directory `dest` (removed again on any refusal); returns the PEFT
    directory inside it."""
    head = fileobj.read(4)
    fileobj.seek(0)
    if head.startswith(b"\x1f\x8b"):
        read = _from_tar
    elif head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        read = _from_zip
    else:
        raise ArchiveRefused("the upload is neither a .tar.gz nor a .zip archive", "file")
    dest.mkdir(parents=True)
    writer = _Writer(dest, limits)
    try:
        with _reading_errors():
            read(fileobj, writer)
        if not writer.names:
            raise ArchiveRefused("the archive holds no files", "file")
        return writer.adapter_dir()
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
