"""Waking up when one file changes, through Linux inotify (`inotify_simple`, the only importer).

Nothing here reads the file or decides anything: an event only means "look now". The tailer
(`bridge.daemon.audit_file`) still learns everything from stat() and read(), so an event lost,
merged or queued twice changes when it looks, never what it reads.

Two watches: the file's directory (the file appearing, being renamed away or replaced, and
writes to whatever is at the path) and the inode the tailer has open (writes to a rotated file
that was moved to another directory while the tailer drains it). `open_watcher` says why when
inotify cannot be used, so the caller can poll instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
from pathlib import Path
from typing import Any

try:  # Linux only; elsewhere the caller polls
    import inotify_simple as _ino
except ImportError:  # pragma: no cover - termios/fcntl are missing on Windows
    _ino = None

# File systems where inotify sees only this host's writes (or none): a writer on another host
# (Vault on a shared volume) would never wake us, so "auto" polls there instead.
REMOTE_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "gpfs",
                       "fuse.sshfs", "fuse.s3fs", "fuse.rclone", "fuse.glusterfs", "fuse.cephfs", "virtiofs"})

_DIR_MASK = 0x100 | 0x80 | 0x40 | 0x200 | 0x2 | 0x4 | 0x400 | 0x800  # CREATE MOVED_TO MOVED_FROM DELETE MODIFY ATTRIB DELETE_SELF MOVE_SELF
_FILE_MASK = 0x2 | 0x4 | 0x400 | 0x800  # MODIFY ATTRIB DELETE_SELF MOVE_SELF
_ONLYDIR = 0x01000000
_Q_OVERFLOW, _IGNORED = 0x4000, 0x8000


def mount_fs_type(path: Path, mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """The file system type of the mount holding `path` (longest matching mount point)."""
    try:
        text = mounts.read_text()
    except OSError:
        return None
    where = os.path.realpath(path.parent if not path.is_dir() else path)
    best, fstype = "", None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = where == point or where.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype


class FileWatcher:
    """An inotify instance watching one path; `wait` returns on a change, a `wake`, or a timeout."""

    def __init__(self, path: Path) -> None:
        if _ino is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this platform")
        self._path = path
        self._name = path.name
        self._ino: Any = _ino.INotify()  # OSError EMFILE: fs.inotify.max_user_instances reached
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._poller.register(self._ino.fileno(), select.POLLIN)
        self._poller.register(self._wake_r, select.POLLIN)
        self._dir_wd: int | None = None
        self._file_wd: int | None = None
        # `wake` runs on other threads: never write to a pipe fd number that close() freed
        # (it may already belong to another file).
        self._lock = threading.Lock()
        self._closed = False
        self.events = 0  # relevant events seen, for tests and debugging

    @property
    def watching_dir(self) -> bool:
        return self._dir_wd is not None

    def watch_dir(self) -> bool:
        """Watch the file's directory; False while it does not exist. OSError ENOSPC: out of watches."""
        try:
            self._dir_wd = int(self._ino.add_watch(str(self._path.parent), _DIR_MASK | _ONLYDIR))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def watch_fd(self, fd: int) -> None:
        """Watch the inode open at `fd` (the file being read, wherever it is renamed to)."""
        try:
            wd = int(self._ino.add_watch(f"/proc/self/fd/{fd}", _FILE_MASK))
        except OSError:
            return  # the directory watch still covers the file while it is at the path
        if self._file_wd is not None and self._file_wd not in (wd, self._dir_wd):
            self._rm(self._file_wd)
        self._file_wd = wd

    def unwatch_fd(self) -> None:
        if self._file_wd is not None and self._file_wd != self._dir_wd:
            self._rm(self._file_wd)
        self._file_wd = None

    def _rm(self, wd: int) -> None:
        with contextlib.suppress(OSError):  # already gone (the file was deleted: the kernel removed the watch)
            self._ino.rm_watch(wd)

    def wait(self, timeout: float) -> bool:
        """Block until an event about the file, a `wake`, or `timeout` seconds. True on an event."""
        ready = self._poller.poll(max(0, int(timeout * 1000)))
        fds = {fd for fd, _ in ready}
        if self._wake_r in fds:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 64):
                    pass
        relevant = False
        if self._ino.fileno() in fds:
            for ev in self._ino.read(timeout=0):
                relevant |= self._relevant(int(ev.wd), int(ev.mask), str(ev.name))
        if relevant:
            self.events += 1
        return relevant

    def _relevant(self, wd: int, mask: int, name: str) -> bool:
        if mask & _Q_OVERFLOW:
            return True  # events were dropped: look, whatever they were
        if mask & _IGNORED:  # the kernel removed this watch (deleted, unmounted)
            if wd == self._dir_wd:
                self._dir_wd = None
            if wd == self._file_wd:
                self._file_wd = None
            return True
        if wd == self._file_wd:
            return True
        if wd == self._dir_wd:
            return name == self._name or not name  # no name: the directory itself moved or went
        return False

    def wake(self) -> None:
        """Make a blocked `wait` return now (from any thread)."""
        with self._lock:
            if self._closed:
                return
            with contextlib.suppress(OSError):  # the pipe is full: a wake is pending already
                os.write(self._wake_w, b"x")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ino.close()
            os.close(self._wake_r)
            os.close(self._wake_w)


def open_watcher(path: Path, mounts: Path = Path("/proc/self/mounts")) -> tuple[FileWatcher | None, str]:
    """An inotify watcher for `path`, or None and why not (then the caller polls)."""
    fstype = mount_fs_type(path, mounts)
    if fstype in REMOTE_FS:
        return None, f"{fstype} file system (inotify sees no remote writes)"
    try:
        watcher = FileWatcher(path)
    except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify_init1
        return None, f"inotify unavailable ({type(exc).__name__}: {exc})"
    try:
        watcher.watch_dir()
    except OSError as exc:  # ENOSPC: fs.inotify.max_user_watches reached
        watcher.close()
        return None, f"inotify watch refused ({type(exc).__name__}: {exc})"
    return watcher, "inotify"
