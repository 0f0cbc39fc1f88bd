"""Files that a kill, a full disk, bit-rot or a second run on the same folder cannot corrupt."""
from __future__ import annotations

import errno
import fcntl
import io
import os
import socket
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable

import torch

TEMPORARY_GLOB = ".*.tmp"


class CorruptFile(ValueError):
    """A checkpoint that does not read back as written (truncated, flipped bytes, not ours)."""


class FolderInUse(ValueError):
    """Another live run holds the lock on a run folder."""


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Calls write(tmp) on a temporary path beside `target`, then renames it into place: readers
    see the old file or the new one, never part of one. The temporary name is unique, so nodes
    preparing one shared folder at once do not write into each other's files. A full disk is an
    OSError saying so and naming `target`; the old file is untouched."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(err.errno, f"no space left on device writing {target}; the previous "
                          "file is kept") from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_durably(path: Path, data: bytes | memoryview) -> None:
    """Every byte written and on the disk before the caller renames `path` into place: a rename
    can reach the disk before the data it names, and after a power loss the new name would point
    at an empty file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def save_verified(obj, target: Path) -> None:
    """torch.save, atomically and durably. The zip format torch.save writes stores a CRC-32 of
    every record, which `load_verified` checks (torch.load does not). The archive is built in
    memory first so that the write to disk is plain Python I/O, whose errors carry an errno."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(target, lambda tmp: write_bytes_durably(tmp, buffer.getbuffer()))


def load_verified(path: Path):
    """torch.load(weights_only=True) of a file whose every record matches its stored CRC-32;
    anything else (truncation, flipped bytes, a file that is not a torch zip archive) is a
    CorruptFile naming the path."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFile(f"{path} is not a readable checkpoint: {err}") from err
    if bad is not None:
        raise CorruptFile(f"{path}: record {bad} does not match its checksum (the file changed "
                          "after it was written)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only rejects foreign objects; torch's own format errors
        raise CorruptFile(f"{path} is not a readable checkpoint: {err}") from err


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Temporary files left by a killed writer. Call only while holding the folder's lock."""
    stale = list(folder.glob(TEMPORARY_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class FolderLock:
    """An exclusive flock on `folder/.lock`, released when the process ends however it ends
    (the kernel drops flocks with the file descriptor, so a killed run leaves nothing to clean).
    The file holds who took it, for the error the next run gets."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise FolderInUse(f"{self.path.parent} is in use by {holder}: one run per --out "
                                  "(wait for it, stop it, or pass another --out)") from None
            raise
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
