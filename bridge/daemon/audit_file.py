"""Following a file audit device like `tail -F`: rotation, truncation, start at the end.

Each complete line goes to an `on_line` callback (see `bridge.daemon.audit` for the line format).
The tailer wakes on inotify events where Linux offers them (`bridge.daemon.inotify`) and polls
otherwise; either way what it reads is decided by stat() and the read position alone.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal

from bridge.daemon.audit import MAX_LINE_BYTES, LineSplitter
from bridge.daemon.inotify import FileWatcher, open_watcher
from bridge.logs import get_logger

log = get_logger(__name__)

_READ_CHUNK = 1 << 16
_MAX_READ_PER_POLL = 4 << 20  # so a huge backlog cannot starve the stop check


class AuditFileTailer:
    """Follows a file audit device like `tail -F`, handing each new complete line to `on_line`.

    - Starts at the end of a file that exists when it starts: after a restart the periodic
      full pass covers the gap, so replaying the log would only cause a burst of syncs.
    - A file that appears later (or after a rotation) is read from its start: all of it is new.
    - Rename rotation (a new inode at the path): the old file is drained until it has been quiet
      for `rotate_grace_seconds`, because Vault keeps writing to it until it reopens the file
      on SIGHUP; then the new file is read from its start.
    - Copy-truncate rotation (the size drops below the read position): read again from 0.
      Lines written between the copy and the truncation are lost; the periodic pass covers them.
    - `watch="auto"`: sleeps until inotify reports a change to the file (its directory and the
      open inode are watched), so a line is read as soon as Vault wrote it. It still looks every
      `recheck_seconds` without an event, because inotify misses some changes (a rotation done
      through another mount, writes from another host); while a rotation drains it looks every
      `poll_seconds` (the grace period is timed, not signalled). Falls back to polling where
      inotify is missing, refused (instance or watch limits) or blind (network file systems).
      No line can slip between a wakeup and the read: the watch exists before the first read,
      every wakeup reads to the end of the file, and a write during that read queues a new event.
    - `watch="poll"` (or the fallback): looks every `poll_seconds`, sleeping through `sleep`,
      which by default waits on `stop` so a stop is immediate.
    """

    def __init__(
        self,
        path: Path,
        on_line: Callable[[bytes], None],
        *,
        poll_seconds: float,
        stop: threading.Event,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        rotate_grace_seconds: float = 1.0,
        watch: Literal["auto", "poll"] = "auto",
        recheck_seconds: float = 1.0,
        open_watch: Callable[[Path], tuple[FileWatcher | None, str]] = open_watcher,
    ) -> None:
        self.path = Path(path)
        self._stop = stop
        self._poll = poll_seconds
        self._clock = clock
        self._sleep: Callable[[float], object] = sleep if sleep is not None else stop.wait
        self._grace = rotate_grace_seconds
        self._splitter = LineSplitter(on_line, max_line_bytes)
        self._fh: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None
        self._pos = 0
        self._first_open = True  # only the file present at start is skipped to its end
        self._old_quiet_since: float | None = None
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None
        self._watch = watch
        self._open_watch = open_watch
        self._recheck = recheck_seconds
        self._watcher: FileWatcher | None = None
        self._watched: tuple[int, int] | None = None  # the inode the watcher follows
        self._closed = threading.Event()
        self.mode = "poll"  # what run() ended up using: "inotify" or "poll"

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name="audit-file-tailer", daemon=True)
        self._thread.start()
        return self._thread

    def run(self) -> None:
        why = "watch: poll"
        if self._watch == "auto":
            # Before the first read, so a write right after it already queues an event.
            self._watcher, why = self._open_watch(self.path)
        self.mode = "inotify" if self._watcher is not None else "poll"
        log.info("audit_tail_started", file=str(self.path), mode=self.mode, **({} if self._watcher else {"why": why}))
        if self._watcher is not None:
            watcher = self._watcher
            # A stop must not wait for the next event or recheck: wake the wait at once.
            threading.Thread(target=self._wake_on_stop, args=(watcher,), name="audit-file-stop", daemon=True).start()
        try:
            while not self._stop.is_set() and not self._closed.is_set():
                if self.poll_once():
                    continue
                timeout = self._poll if self._watcher is None else self._wait_seconds(self._watcher)
                if self._watcher is None:  # polling, or the watcher was just given up
                    self._sleep(timeout)
                else:
                    self._watcher.wait(timeout)
        finally:
            self._release()

    def _wake_on_stop(self, watcher: FileWatcher) -> None:
        while not self._closed.is_set():
            if self._stop.wait(1.0):  # the second of slack only bounds this thread's life after close()
                watcher.wake()
                return

    def _wait_seconds(self, watcher: FileWatcher) -> float:
        if not watcher.watching_dir:
            try:
                watching = watcher.watch_dir()
            except OSError as exc:  # out of inotify watches: polling still works
                log.warning("audit_tail_polling", file=str(self.path), why=f"inotify watch refused ({type(exc).__name__})")
                self._watcher = None
                self.mode = "poll"
                watcher.close()
                return self._poll
            if not watching:
                return self._poll  # the directory does not exist yet: look for it like a poller
        # By inode, not fd number: the file opened after a rotation may get the old one's number.
        ident = None if self._fh is None else self._ident
        if ident != self._watched:
            if self._fh is None:
                watcher.unwatch_fd()
            else:
                watcher.watch_fd(self._fh.fileno())
            self._watched = ident
        return self._poll if self._old_quiet_since is not None else self._recheck

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def close(self) -> None:
        """Stop following. The tailer's own thread, if running, releases the file and the watch."""
        self._closed.set()
        watcher = self._watcher
        if watcher is not None:
            watcher.wake()
        if self._thread is None or not self._thread.is_alive() or self._thread is threading.current_thread():
            self._release()

    def _release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def poll_once(self) -> bool:
        """One look at the file; True when there is probably more to read right away."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            self._warn_once("stat", exc)
            st = None
        if self._fh is None:
            return self._open(st)
        ident = None if st is None else (st.st_dev, st.st_ino)
        if ident == self._ident and st is not None and st.st_size < self._pos:
            log.info("audit_tail_truncated", file=str(self.path))
            self._fh.seek(0)
            self._pos = 0
            self._splitter.reset()
        more, got = self._read()
        if ident is not None and ident != self._ident:
            # A new file is at the path. Drain the old one until the writer has moved over.
            now = self._clock()
            if got or self._old_quiet_since is None:
                self._old_quiet_since = now
            elif now - self._old_quiet_since >= self._grace:
                log.info("audit_tail_rotated", file=str(self.path))
                self._fh.close()
                self._fh = None
                self._splitter.reset()
                self._old_quiet_since = None
                return self._open(st)
        else:
            self._old_quiet_since = None
        return more

    def _open(self, st: os.stat_result | None) -> bool:
        skip_to_end = self._first_open
        self._first_open = False
        if st is None:
            return False
        try:
            fh = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open across polls)
        except OSError as exc:
            self._warn_once("open", exc)
            return False
        fst = os.fstat(fh.fileno())  # the file actually opened, not the one stat() saw
        self._fh = fh
        self._ident = (fst.st_dev, fst.st_ino)
        self._pos = fh.seek(0, os.SEEK_END) if skip_to_end else 0
        if self._pos > 0:
            # Started mid-line (Vault was writing): the rest of that line is not a whole entry.
            fh.seek(self._pos - 1)
            if fh.read(1) != b"\n":
                self._splitter.skip_to_next_line()
        self._warned.clear()
        return True

    def _read(self) -> tuple[bool, bool]:
        assert self._fh is not None
        total = 0
        while total < _MAX_READ_PER_POLL:
            try:
                data = self._fh.read(_READ_CHUNK)
            except OSError as exc:
                self._warn_once("read", exc)
                return False, total > 0
            if not data:
                return False, total > 0
            total += len(data)
            self._pos += len(data)
            self._splitter.feed(data)
        return True, True

    def _warn_once(self, what: str, exc: OSError) -> None:
        # A missing permission on the audit file would otherwise log every poll.
        if what not in self._warned:
            self._warned.add(what)
            log.warning("audit_tail_error", file=str(self.path), op=what, error=type(exc).__name__)
