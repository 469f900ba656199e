"""The audit file tailer woken by inotify: real files, the real kernel, no mocks.

Each tailer here polls so rarely (`poll_seconds`/`recheck_seconds` 30 s) that a line arriving
within the test's few seconds was delivered because inotify woke the tailer, unless the test
is about the fallback or the safety net, which set the intervals they rely on.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.daemon.audit_file import AuditFileTailer
from bridge.daemon.inotify import FileWatcher, mount_fs_type, open_watcher
from tests.support.procs import eventually

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
SLOW = 30.0  # seconds: no poll or recheck happens within a test


class CountingTailer(AuditFileTailer):
    """Counts finished looks at the file, to tell sleeping from spinning (and to know it is positioned)."""

    looks = 0

    def poll_once(self) -> bool:
        more = super().poll_once()
        self.looks += 1
        return more


class DeafWatcher(FileWatcher):
    """A real watcher that never watches the file it is given (as inotify misses a remote write)."""

    def watch_fd(self, fd: int) -> None:
        pass


@pytest.fixture
def running() -> Iterator[Callable[..., CountingTailer]]:
    started: list[tuple[CountingTailer, threading.Event]] = []

    def start(path: Path, got: list[bytes], **kw: object) -> CountingTailer:
        stop = threading.Event()
        opts: dict[str, object] = {"poll_seconds": SLOW, "recheck_seconds": SLOW, "rotate_grace_seconds": 0.3, **kw}
        t = CountingTailer(path, got.append, stop=stop, **opts)  # type: ignore[arg-type]
        t.start()
        started.append((t, stop))
        assert eventually(lambda: t.looks >= 1, timeout=5)  # watching and positioned
        return t

    yield start
    for t, stop in started:
        stop.set()
        t.join(5)


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_a_write_is_read_at_once_not_at_the_next_poll(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"before-start\n")
    got: list[bytes] = []
    t = running(log_file, got)
    assert t.mode == "inotify"
    written = time.monotonic()
    append(log_file, b"one\n")
    assert eventually(lambda: got == [b"one"], timeout=5)
    assert time.monotonic() - written < 2.0  # far below the 30 s poll: an event woke it
    append(log_file, b"par")
    append(log_file, b"tial\n")
    assert eventually(lambda: got == [b"one", b"partial"], timeout=5)
    looks = t.looks
    time.sleep(0.5)
    assert t.looks - looks <= 1  # idle: asleep on the inotify fd, not spinning


def test_rename_rotation_with_inotify(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    other = tmp_path / "archive"
    other.mkdir()
    got: list[bytes] = []
    # poll_seconds short: draining a rotated file ends on a timer (grace 0.3 s), not an event.
    running(log_file, got, poll_seconds=0.05)
    with open(log_file, "ab", buffering=0) as writer:  # Vault keeps its handle until SIGHUP
        writer.write(b"a1\n")
        assert eventually(lambda: got == [b"a1"], timeout=5)
        os.rename(log_file, other / "audit.log.1")  # moved out of the watched directory
        writer.write(b"a2\n")  # still written to the moved file: only the inode watch sees it
        assert eventually(lambda: got == [b"a1", b"a2"], timeout=5)
        log_file.write_bytes(b"b1\n")  # the new file at the path
        writer.write(b"a3\n")
        assert eventually(lambda: got == [b"a1", b"a2", b"a3", b"b1"], timeout=5)  # old file drained first
    append(log_file, b"b2\n")
    assert eventually(lambda: got[-1:] == [b"b2"], timeout=5)
    assert got == [b"a1", b"a2", b"a3", b"b1", b"b2"]


def test_copytruncate_with_inotify(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"x" * 100 + b"\n")
    got: list[bytes] = []
    running(log_file, got)
    append(log_file, b"before\n")
    assert eventually(lambda: got == [b"before"], timeout=5)
    with open(log_file, "r+b") as f:  # logrotate copytruncate
        f.truncate(0)
    append(log_file, b"after\n")
    assert eventually(lambda: got == [b"before", b"after"], timeout=5)


def test_a_file_created_after_the_start_is_read_from_its_start(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    got: list[bytes] = []
    t = running(log_file, got)
    assert t.mode == "inotify"
    log_file.write_bytes(b"first\nsecond\n")
    assert eventually(lambda: got == [b"first", b"second"], timeout=5)


def test_a_burst_across_a_rotation_loses_no_line(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    got: list[bytes] = []
    running(log_file, got, poll_seconds=0.05)
    lines = [f'{{"n": {i}, "pad": "{"p" * (i % 97)}"}}'.encode() for i in range(20_000)]
    blob_a = b"".join(line + b"\n" for line in lines[:12_000])
    blob_b = b"".join(line + b"\n" for line in lines[12_000:16_000])
    blob_c = b"".join(line + b"\n" for line in lines[16_000:])
    with open(log_file, "ab", buffering=0) as writer:
        for i in range(0, len(blob_a), 4093):  # odd-sized writes: lines split across them
            writer.write(blob_a[i : i + 4093])
        os.rename(log_file, tmp_path / "audit.log.1")
        for i in range(0, len(blob_b), 777):  # Vault still writes to the renamed file
            writer.write(blob_b[i : i + 777])
        with open(log_file, "ab", buffering=0) as new:
            for i in range(0, len(blob_c), 1999):
                new.write(blob_c[i : i + 1999])
    assert eventually(lambda: len(got) >= len(lines), timeout=20)
    assert got == lines  # every line, once, in order


def test_a_tailer_stops_promptly_while_asleep_on_inotify(tmp_path: Path) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    for how in ("stop", "close"):
        stop = threading.Event()
        t = CountingTailer(log_file, lambda _b: None, poll_seconds=SLOW, stop=stop, recheck_seconds=SLOW)
        t.start()
        assert eventually(lambda t=t: t.looks >= 1, timeout=5)  # type: ignore[misc]
        assert t.mode == "inotify"
        t0 = time.monotonic()
        if how == "stop":
            stop.set()
        else:
            t.close()
        t.join(5)
        assert time.monotonic() - t0 < 1.0, how
        assert t._thread is not None and not t._thread.is_alive()
        stop.set()


def test_the_safety_net_finds_what_inotify_did_not_report(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    # A watcher on another directory hears nothing about this file, as inotify hears nothing of
    # a change made through another mount or host: the periodic recheck must still find it.
    (tmp_path / "elsewhere").mkdir()
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    deaf = DeafWatcher(tmp_path / "elsewhere" / "x.log")
    assert deaf.watch_dir()
    got: list[bytes] = []
    t = running(log_file, got, recheck_seconds=0.2, open_watch=lambda _p: (deaf, "inotify"))
    assert t.mode == "inotify"
    append(log_file, b"unheard\n")
    assert eventually(lambda: got == [b"unheard"], timeout=5)
    assert deaf.events == 0  # it was the recheck, not an event


def test_falls_back_to_polling_on_a_network_file_system(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 rw 0 0\nserver:/export {tmp_path} nfs4 rw,relatime 0 0\n")
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    watcher, why = open_watcher(log_file, mounts)
    assert watcher is None and "nfs4" in why
    got: list[bytes] = []
    t = running(log_file, got, poll_seconds=0.05, open_watch=lambda p: open_watcher(p, mounts))
    assert t.mode == "poll"
    append(log_file, b"polled\n")
    assert eventually(lambda: got == [b"polled"], timeout=5)


def test_falls_back_when_inotify_cannot_be_had(tmp_path: Path) -> None:
    # Out of file descriptors (as when fs.inotify.max_user_instances is reached, inotify_init1
    # fails with EMFILE): in a child process, so this test's own limits stay untouched.
    script = f"""
import os, resource, sys
from pathlib import Path
import inotify_simple
from bridge.daemon.inotify import open_watcher
inotify_simple.INotify().close()  # loads libc first: finding it needs a file descriptor too
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass
watcher, why = open_watcher(Path({str(tmp_path / "audit.log")!r}))
print(watcher is None, why)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, check=True).stdout
    assert out.startswith("True inotify unavailable"), out
    assert "Errno 24" in out, out


def test_poll_setting_never_uses_inotify(tmp_path: Path, running: Callable[..., CountingTailer]) -> None:
    log_file = tmp_path / "audit.log"
    log_file.write_bytes(b"")
    got: list[bytes] = []
    t = running(log_file, got, watch="poll", poll_seconds=0.05)
    assert t.mode == "poll"
    append(log_file, b"x\n")
    assert eventually(lambda: got == [b"x"], timeout=5)


def test_mount_fs_type_takes_the_longest_mount_point(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/root / ext4 rw 0 0\ntmpfs {tmp_path} tmpfs rw 0 0\nsrv:/x {tmp_path}/nfs nfs rw 0 0\n"
                      f"srv:/y {tmp_path}/nf nfs rw 0 0\n")
    assert mount_fs_type(tmp_path / "audit.log", mounts) == "tmpfs"
    assert mount_fs_type(tmp_path / "nfs" / "audit.log", mounts) == "nfs"
    assert mount_fs_type(tmp_path / "nfsx" / "audit.log", mounts) == "tmpfs"  # a prefix of a name is not a parent
    assert mount_fs_type(Path("/var/log/audit.log"), mounts) == "ext4"
    assert mount_fs_type(Path("/x"), tmp_path / "missing") is None
