"""One writer per output directory.

A stage takes an exclusive `fcntl.flock` on `<output dir>/.domino.lock` for as long as it writes
there, and a second process asking for the same directory is refused at once, with the holder's
pid, host, stage and command in the message. The kernel drops a flock when its process dies
(SIGKILL included), so a lock left by a crashed run never blocks the rerun that resumes it; the
file itself stays (unlinking a flocked file races with a process that has it open).

    from domino.core.locking import output_lock
    with output_lock(out_dir, "evaluate"):
        ...  # every write into out_dir

The lock is re-entrant within a process (synthesize.py curate=true samples, then curates into the
same directory while holding it). Under DDP/DeepSpeed only the launching process (rank 0 of node
0) takes it: the ranks Lightning starts for the same run share its directory by design. Local
filesystems only: flock over NFS is not reliable.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".domino.lock"
_held: dict[str, list] = {}  # realpath of the lock file -> [fd, depth]
_guard = threading.Lock()


class OutputLocked(RuntimeError):
    """Another live process is writing into the directory."""

    def __init__(self, directory: Path, stage: str, holder: dict):
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('stage', '?')}, "
               f"since {holder.get('since', '?')}; command: {holder.get('command', '?')})") if holder else \
            "another process (it has not written its details yet)"
        super().__init__(f"{stage}: output directory {directory} is in use by {who}. Two writers would "
                         "duplicate or interleave records: wait for it to finish, or use another output "
                         "directory. (A lock left by a dead process is released by the kernel and never blocks.)")
        self.directory, self.holder = directory, holder


def _holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def acquire(directory: str | os.PathLike, stage: str) -> Path:
    """Take the lock of `directory` (created if missing) or raise OutputLocked. Pair with release()."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            return path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputLocked(directory, stage, holder) from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        _held[key] = [fd, 1]
    return path


def release(directory: str | os.PathLike) -> None:
    key = os.path.realpath(Path(directory) / LOCK_NAME)
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _held[key]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # no stale holder details for the next reader
        finally:
            os.close(fd)  # closing the last descriptor drops the flock


def launched_rank() -> bool:
    """True in a process a distributed launcher started for another rank of the same run."""
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK"))


@contextmanager
def output_lock(directory: str | os.PathLike, stage: str) -> Iterator[Path]:
    """Hold the exclusive lock of `directory` for the duration of the block (see the module doc)."""
    if launched_rank():
        yield Path(directory) / LOCK_NAME
        return
    path = acquire(directory, stage)
    try:
        yield path
    finally:
        release(directory)
