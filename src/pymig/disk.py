"""Disk images: the raw files behind a guest's disks, and which parts of them were written.

A :class:`DiskImage` is the one way pymig reads and writes a disk image: positioned reads and
writes that finish or raise, ``fdatasync`` for a flush, the image's size and whether it is
read-only, and its holes (``SEEK_DATA`` / ``SEEK_HOLE``; zeroes are written as holes where the
file system can punch them).  The guest's disk controller (:mod:`pymig.kvm.ata`) and, for block
migration, the code that copies an image both go through it.

Dirty chunks.  While logging is on (:meth:`DiskImage.start_dirty_log`), every write marks the
chunks (:data:`DIRTY_CHUNK_BYTES`, 1 MiB, unless told otherwise) it touched, *after* the bytes
are in the file, so a reader that takes the log with :meth:`DiskImage.sync_dirty` and then
reads the chunks it names never misses a write: a write that ends after the sync is marked
for the next one.  A sync returns the chunks written since the previous sync (or since logging
started) as a bitmap of uint64 words, bit ``i`` for chunk ``i`` (the dirty log's layout for
RAM), and clears them.  A write that fails part-way marks its chunks all the same: some of its
bytes may have reached the file.

``--disk PATH[,readonly][,shared]`` (:class:`DiskSpec`): ``readonly`` opens the file
``O_RDONLY`` and the guest's writes fail; ``shared`` says the destination of a migration opens
the same file (shared storage), so the image need not travel with the guest.

An image an incoming block migration is writing (:mod:`pymig.block`) has a marker file beside
it, ``PATH.incomplete``, until the guest runs on it; opening it for a guest is refused, with
the marker's reason (:func:`check_complete`).  That copy goes past the page cache where the
file system allows it (:meth:`DiskImage.open_direct`, :meth:`DiskImage.write_through`): a
whole image written through the cache takes as much fresh memory as it has data, which costs
more than the copy (first touch of memory the hypervisor took back, docs/performance.md) and
crowds out the host's cache, and is throttled to the storage's rate all the same once the
kernel's dirty limit is reached.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import mmap
import os
import re
import stat
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from pymig.errors import DiskError

SECTOR_BYTES = 512
DIRTY_CHUNK_BYTES = 1 << 20
MAX_DISK_BYTES = SECTOR_BYTES << 48  # what LBA48 addresses
MAX_PATH_CHARS = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
DISK_OPTIONS = ("readonly", "shared")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
ZERO_WRITE_BYTES = 1 << 20  # zeroes written per call where a hole cannot be punched
# O_DIRECT I/O: file offsets, lengths and memory aligned to this (a page: every device's
# logical block and memory alignment divide it)
DIRECT_ALIGN = 4096
DIRECT_BOUNCE_BYTES = 1 << 20  # the aligned buffer data that is not aligned goes through


@dataclass(frozen=True)
class DiskSpec:
    """A disk as the user names it: its image file and how it is used."""

    path: str
    readonly: bool = False
    shared: bool = False
    checkpoint: str | None = None  # a checkpoint to create if the image has none by the name

    @classmethod
    def parse(cls, text: str) -> "DiskSpec":
        """``PATH[,readonly][,shared][,checkpoint=NAME]`` (ValueError naming what is
        wrong)."""
        path, *options = text.split(",")
        if not path:
            raise ValueError(f"--disk {text!r}: no image path")
        checkpoint = None
        for option in [o for o in options if o.startswith("checkpoint=")]:
            checkpoint = option.partition("=")[2]
            if not CHECKPOINT_NAME.match(checkpoint):
                raise ValueError(f"--disk {text!r}: a checkpoint name is 1 to 64 letters, "
                                 f"digits, '.', '_' or '-'")
        unknown = [o for o in options if o not in DISK_OPTIONS
                   and not o.startswith("checkpoint=")]
        if unknown:
            raise ValueError(f"--disk {text!r}: unknown option(s) {unknown} (known: "
                             f"{', '.join(DISK_OPTIONS)}, checkpoint=NAME)")
        return cls(path, readonly="readonly" in options, shared="shared" in options,
                   checkpoint=checkpoint)

    def open(self) -> "DiskImage":
        image = DiskImage(self.path, readonly=self.readonly)
        if self.checkpoint is not None:
            try:
                image.add_checkpoint(self.checkpoint)
            except BaseException:
                image.close()
                raise
        return image


CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
CHECKPOINT_SUFFIX = ".checkpoint-"


def checkpoint_files(path: str, name: str) -> tuple[str, str]:
    """The identity (JSON) and the map (a bit per chunk) of checkpoint ``name`` of the image
    at ``path``."""
    base = f"{os.fspath(path)}{CHECKPOINT_SUFFIX}{name}"
    return base + ".json", base + ".map"


def checkpoint_names(path: str) -> list[str]:
    """The checkpoints kept beside the image at ``path``."""
    prefix = os.path.basename(os.fspath(path)) + CHECKPOINT_SUFFIX
    try:
        entries = os.listdir(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return []
    return sorted(e[len(prefix):-len(".json")] for e in entries
                  if e.startswith(prefix) and e.endswith(".json")
                  and CHECKPOINT_NAME.match(e[len(prefix):-len(".json")]))


class Checkpoint:
    """A named point in an image's history and the chunks written since (``--disk
    PATH,checkpoint=NAME``): an identity file (its name, a random id, the image's size) and a
    persistent map, a bit per :data:`DIRTY_CHUNK_BYTES` chunk, beside the image.  Every
    write to the image marks its chunks in the map *before* its bytes go to the file, so the
    map never misses a chunk, even if the process dies between the two.  A copy of the image
    taken any time after the checkpoint was made, with its identity file, differs from the
    image only in chunks the map names: what an incremental block migration sends."""

    def __init__(self, path: str, name: str, size_bytes: int, *, readonly: bool = False,
                 create: bool = False):
        self.name = name
        self.identity_path, self.map_path = checkpoint_files(path, name)
        self.chunk_bytes = DIRTY_CHUNK_BYTES
        self.chunks = -(-size_bytes // self.chunk_bytes)
        map_bytes = -(-self.chunks // 8)
        if create and not os.path.exists(self.identity_path):
            with open(self.map_path, "wb") as handle:
                handle.truncate(map_bytes)
            identity = {"name": name, "id": uuid.uuid4().hex, "size_bytes": size_bytes,
                        "chunk_bytes": self.chunk_bytes,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with open(self.identity_path + ".tmp", "w") as handle:
                json.dump(identity, handle)
            os.replace(self.identity_path + ".tmp", self.identity_path)
        self.identity = read_checkpoint_identity(self.identity_path)
        if (self.identity["size_bytes"] != size_bytes
                or self.identity["chunk_bytes"] != self.chunk_bytes):
            raise DiskError(f"checkpoint {name} of {path} is of a {self.identity['size_bytes']}"
                            f"-byte image in {self.identity['chunk_bytes']}-byte chunks, not "
                            f"{size_bytes} in {self.chunk_bytes}")
        try:
            if not os.path.exists(self.map_path) and not readonly:
                with open(self.map_path, "wb") as handle:  # a copy given its identity alone
                    handle.truncate(map_bytes)
            if os.path.getsize(self.map_path) != map_bytes:
                raise DiskError(f"checkpoint {name} of {path}: its map {self.map_path} is "
                                f"{os.path.getsize(self.map_path)} bytes, not {map_bytes}")
            self._map = np.memmap(self.map_path, dtype=np.uint8,
                                  mode="r" if readonly else "r+", shape=(map_bytes,))
        except OSError as exc:
            raise DiskError(f"checkpoint {name} of {path}: {exc.strerror or exc}") from None

    @property
    def id(self) -> str:
        return self.identity["id"]

    def mark(self, offset: int, length: int) -> None:
        first = offset // self.chunk_bytes
        last = (offset + length - 1) // self.chunk_bytes
        for chunk in range(first, last + 1):
            self._map[chunk >> 3] |= np.uint8(1 << (chunk & 7))

    def written(self) -> np.ndarray:
        """Per chunk, whether it was written since the checkpoint (bools)."""
        return np.unpackbits(np.asarray(self._map), bitorder="little")[: self.chunks] \
            .astype(bool)

    def written_bytes(self) -> int:
        """Bytes of the image in the chunks written since the checkpoint (QMP's ``count``)."""
        written = self.written()
        count = int(np.count_nonzero(written)) * self.chunk_bytes
        if self.chunks and written[-1]:  # the last chunk may be partial
            count -= self.chunks * self.chunk_bytes - self.identity["size_bytes"]
        return count

    def flush(self) -> None:
        if self._map is not None and self._map.mode != "r":
            self._map.flush()

    def close(self) -> None:
        if self._map is not None:
            self.flush()
            self._map = None


def read_checkpoint_identity(identity_path: str) -> dict:
    """A checkpoint's identity file, checked (DiskError saying what is wrong)."""
    try:
        with open(identity_path, "rb") as handle:
            identity = json.loads(handle.read(4096))
    except FileNotFoundError:
        raise DiskError(f"no checkpoint identity {identity_path}") from None
    except (OSError, ValueError) as exc:
        raise DiskError(f"checkpoint identity {identity_path} cannot be read: {exc}") from None
    if not (isinstance(identity, dict) and isinstance(identity.get("id"), str)
            and re.fullmatch(r"[0-9a-f]{32}", identity["id"])
            and isinstance(identity.get("name"), str)
            and type(identity.get("size_bytes")) is int
            and type(identity.get("chunk_bytes")) is int):
        raise DiskError(f"checkpoint identity {identity_path} is not one pymig wrote")
    return identity


class DiskImage:
    """A raw disk image, opened for the guest (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False,
                 allow_incomplete: bool = False):
        self.path = os.fspath(path)
        self.readonly = readonly
        if not allow_incomplete:
            check_complete(self.path)
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if readonly else os.O_RDWR)
                              | os.O_CLOEXEC)
        except OSError as exc:
            raise DiskError(f"disk image {self.path}: {exc.strerror}") from None
        try:
            self.size_bytes = _size_of(self.fd, self.path)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._direct_fd = -1  # open_direct(): the same file with O_DIRECT
        self._bounce: mmap.mmap | None = None
        self.direct_bytes = 0  # bytes write_through put past the page cache
        self._dirty: np.ndarray | None = None
        self._chunk_bytes = DIRTY_CHUNK_BYTES
        # every checkpoint kept beside the image marks what is written from now on too,
        # whether or not this run named it: a write it missed would never reach a copy
        self.checkpoints: dict[str, Checkpoint] = {}
        try:
            for name in checkpoint_names(self.path):
                self.checkpoints[name] = Checkpoint(self.path, name, self.size_bytes,
                                                    readonly=readonly)
        except BaseException:
            self.close()
            raise

    def add_checkpoint(self, name: str) -> "Checkpoint":
        """Checkpoint ``name`` of this image, made now if it has none by that name."""
        with self._lock:  # a write in flight marks every checkpoint or none of it
            if name not in self.checkpoints:
                if self.readonly:
                    raise DiskError(f"{self.path} is read-only: a checkpoint cannot be made")
                self.checkpoints[name] = Checkpoint(self.path, name, self.size_bytes,
                                                    create=True)
            return self.checkpoints[name]

    def remove_checkpoint(self, name: str) -> None:
        """Forget checkpoint ``name`` and delete its identity and map (KeyError if there is
        none by that name)."""
        with self._lock:
            checkpoint = self.checkpoints.pop(name)
        checkpoint.close()
        for path in (checkpoint.identity_path, checkpoint.map_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    @property
    def sectors(self) -> int:
        return self.size_bytes // SECTOR_BYTES

    @property
    def closed(self) -> bool:
        return self.fd < 0

    # --- I/O ---------------------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (inside the image).  OSError if the file fails or
        ends before them (it shrank under the guest: ``EIO``, saying so)."""
        self._check_range(offset, length)
        parts, done = [], 0
        while done < length:
            data = os.pread(self.fd, length - done, offset + done)
            if not data:
                size = os.fstat(self.fd).st_size
                raise OSError(errno.EIO, f"the image ends at byte {size}, before "
                                         f"{offset + length} (it shrank from "
                                         f"{self.size_bytes})")
            parts.append(data)
            done += len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pread_into(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the image's bytes from ``offset`` (inside the image): a reused
        buffer, where :meth:`pread` would allocate fresh memory for each read."""
        length = len(view)
        self._check_range(offset, length)
        done = 0
        while done < length:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                size = os.fstat(self.fd).st_size
                raise OSError(errno.EIO, f"the image ends at byte {size}, before "
                                         f"{offset + length} (it shrank from "
                                         f"{self.size_bytes})")
            done += got

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` at ``offset`` (inside the image), or raise OSError."""
        length = len(data)
        self._check_range(offset, length)
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        view = memoryview(data).cast("B")
        self._mark_checkpoints(offset, length)
        done = 0
        try:
            while done < length:
                done += os.pwrite(self.fd, view[done:], offset + done)
        finally:
            self._mark(offset, length)

    def open_direct(self) -> bool:
        """Have :meth:`write_through` write past the page cache (``O_DIRECT``); False, and it
        writes through the cache as :meth:`pwrite` does, where the file system refuses."""
        if self._direct_fd >= 0:
            return True
        if self.readonly or not O_DIRECT:
            return False
        try:
            self._direct_fd = os.open(self.path, os.O_RDWR | O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return False
        return True

    def close_direct(self) -> None:
        """Back to writes through the page cache only (the direct descriptor closed)."""
        fd, self._direct_fd = self._direct_fd, -1
        self._bounce = None
        if fd >= 0:
            os.close(fd)

    def write_through(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """As :meth:`pwrite`, but after :meth:`open_direct` the whole aligned pages of the
        range go straight to the storage: from ``data`` itself where it sits page-aligned in
        memory, else through one reused aligned buffer.  A head or tail that is not whole
        pages goes through the page cache (other pages: the two never share one)."""
        length = len(data)
        if self._direct_fd < 0:
            self.pwrite(offset, data)
            return
        self._check_range(offset, length)
        view = memoryview(data).cast("B")
        first = min(-offset % DIRECT_ALIGN, length)
        last = first + (length - first) // DIRECT_ALIGN * DIRECT_ALIGN
        if last == first:
            self.pwrite(offset, view)
            return
        self._mark_checkpoints(offset, length)
        try:
            if first:
                self._pwrite_all(self.fd, view[:first], offset)
            done = self._write_direct(offset + first, view[first:last])
            self._pwrite_all(self.fd, view[first + done:], offset + first + done)
        finally:
            self._mark(offset, length)

    def _write_direct(self, offset: int, view: memoryview) -> int:
        """Whole pages at a page-aligned ``offset`` with O_DIRECT: how many bytes went (all,
        unless the file system refused one, or took a short count: then the caller writes
        the rest through the cache)."""
        done = 0
        aligned = buffer_address(view) % DIRECT_ALIGN == 0
        while done < len(view):
            if aligned:
                piece = view[done:]
            else:
                if self._bounce is None:
                    self._bounce = mmap.mmap(-1, DIRECT_BOUNCE_BYTES)
                n = min(len(view) - done, DIRECT_BOUNCE_BYTES)
                self._bounce[:n] = view[done:done + n]
                piece = memoryview(self._bounce)[:n]
            try:
                got = os.pwrite(self._direct_fd, piece, offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.close_direct()  # this file system takes no O_DIRECT write after all
                return done
            finally:
                piece.release()
            done += got
            self.direct_bytes += got
            if got % DIRECT_ALIGN or not got:
                break
        return done

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``[offset, offset + length)`` read as zeroes, as a hole where the file system
        punches one, else by writing zeroes."""
        self._check_range(offset, length)
        if self.readonly:
            raise OSError(errno.EROFS, f"{self.path} is open read-only")
        self._mark_checkpoints(offset, length)
        try:
            if _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset,
                               length) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, f"punching a hole in {self.path}: {os.strerror(err)}")
            zero = bytes(min(length, ZERO_WRITE_BYTES))
            for at in range(offset, offset + length, len(zero)):
                view = memoryview(zero)[:min(len(zero), offset + length - at)]
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], at + done)
        finally:
            self._mark(offset, length)

    def flush(self) -> None:
        """Everything written so far is on stable storage when this returns (fdatasync),
        and so are the checkpoints' maps."""
        for checkpoint in self.checkpoints.values():
            checkpoint.flush()
        os.fdatasync(self.fd)

    def data_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the parts of ``[start, end)`` that may hold data, in order;
        the rest are holes, which read as zeroes.  Where the file system cannot tell, the
        whole range is one extent."""
        end = self.size_bytes if end is None else min(end, self.size_bytes)
        pos = start
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but hole from pos to the end of file
                    return
                if exc.errno == errno.EINVAL:  # no SEEK_DATA here: all of it may be data
                    yield pos, end - pos
                    return
                raise
            if data >= end:
                return
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data, hole - data
            pos = hole

    def close(self) -> None:
        for checkpoint in getattr(self, "checkpoints", {}).values():
            checkpoint.close()
        if getattr(self, "_direct_fd", -1) >= 0:
            self.close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "DiskImage":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size_bytes:
            raise ValueError(f"[{offset}, {offset + length}) is outside the "
                             f"{self.size_bytes}-byte image {self.path}")

    # --- dirty chunks ------------------------------------------------------------------------

    @property
    def dirty_chunk_bytes(self) -> int:
        return self._chunk_bytes

    @property
    def chunks(self) -> int:
        """How many dirty-log chunks cover the image (the last may be partial)."""
        return -(-self.size_bytes // self._chunk_bytes)

    @property
    def logging(self) -> bool:
        return self._dirty is not None

    def start_dirty_log(self, chunk_bytes: int = DIRTY_CHUNK_BYTES) -> None:
        """Log the chunks written from now on (a clean log: earlier writes are not in it)."""
        if chunk_bytes <= 0 or chunk_bytes % SECTOR_BYTES:
            raise ValueError(f"a dirty chunk is a positive multiple of {SECTOR_BYTES} bytes, "
                             f"not {chunk_bytes}")
        with self._lock:
            self._chunk_bytes = chunk_bytes
            self._dirty = np.zeros(-(-self.chunks // 64), dtype=np.uint64)

    def stop_dirty_log(self) -> None:
        with self._lock:
            self._dirty = None

    def sync_dirty(self) -> np.ndarray:
        """The chunks written since the previous sync or the start (bit i: chunk i), which
        are then clear.  ValueError while logging is off."""
        with self._lock:
            if self._dirty is None:
                raise ValueError(f"dirty logging of {self.path} is off")
            taken = self._dirty
            self._dirty = np.zeros_like(taken)
        return taken

    def _mark_checkpoints(self, offset: int, length: int) -> None:
        if length and self.checkpoints:
            with self._lock:
                for checkpoint in self.checkpoints.values():
                    checkpoint.mark(offset, length)

    def _mark(self, offset: int, length: int) -> None:
        if not length:
            return
        with self._lock:
            bitmap = self._dirty
            if bitmap is None:
                return
            first = offset // self._chunk_bytes
            last = (offset + length - 1) // self._chunk_bytes
            for chunk in range(first, last + 1):
                bitmap[chunk >> 6] |= np.uint64(1 << (chunk & 63))


def buffer_address(view) -> int:
    """Where ``view``'s bytes start in memory."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def incomplete_marker(path: str) -> str:
    """The file beside an image that says it is partial (an incoming block migration into
    it has not completed)."""
    return os.fspath(path) + ".incomplete"


def check_complete(path: str) -> None:
    """DiskError, with the reason, if ``path`` is marked partial (:func:`incomplete_marker`):
    a guest must never run on half a disk."""
    marker = incomplete_marker(path)
    try:
        with open(marker, "rb") as handle:
            text = handle.read(4096)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DiskError(f"disk image {path}: its marker {marker} cannot be read "
                        f"({exc.strerror})") from None
    try:
        info = json.loads(text)
        reason = f"{info['reason']} (began {info['began']})"
    except (ValueError, KeyError, TypeError):
        reason = "an incoming migration into it has not completed"
    raise DiskError(f"disk image {path} is incomplete: {reason}; migrate into it again, or "
                    f"remove {marker} to use it as it is")


def _size_of(fd: int, path: str) -> int:
    """The usable size of an image: a regular file's length or a block device's, a whole
    number of sectors, at most what LBA48 addresses."""
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        size = info.st_size
    elif stat.S_ISBLK(info.st_mode):
        size = os.lseek(fd, 0, os.SEEK_END)
    else:
        raise DiskError(f"disk image {path}: not a regular file or a block device")
    if size == 0:
        raise DiskError(f"disk image {path} is empty (create it with a size first, e.g. "
                        f"truncate -s 64M {path})")
    if size % SECTOR_BYTES:
        raise DiskError(f"disk image {path} is {size} bytes, not a whole number of "
                        f"{SECTOR_BYTES}-byte sectors")
    if size > MAX_DISK_BYTES:
        raise DiskError(f"disk image {path} is {size} bytes, more than LBA48 addresses "
                        f"({MAX_DISK_BYTES})")
    return size
