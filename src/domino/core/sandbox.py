"""Execute untrusted programs against tests, one fresh interpreter per program.

Isolation, strongest available first (`isolation=auto` picks it, see docs/evaluation.md):

- `namespaces` (needs root and util-linux `unshare`): `unshare --net --pid --mount-proc --fork
  --kill-child` starts `python -s -P sandbox_child.py` as pid 1 of new network/pid/mount namespaces.
  The child mounts private tmpfs over /tmp, /var/tmp, /dev/shm, hides directories the sandbox uid
  cannot traverse (e.g. /root), lowers rlimits, then drops to a dedicated unprivileged uid (one
  per worker slot, so RLIMIT_NPROC is a real per-sandbox process cap even though we are root).
  No network interface but a down loopback; when pid 1 dies the kernel kills every process of
  the sandbox, including ones that called setsid() or double-forked.
- `process`: same child, same rlimits, same uid as the harness, private temp working dir, new
  session. No network or filesystem isolation: trusted-ish code only.

In both modes the child is a *supervisor* that forks the worker running the untrusted code and
never runs any itself: it kills the whole sandbox at its own hard wall clock, when the harness
closes the lifeline pipe, or when the harness process dies (pidfd / pipe EOF), so neither the time
limit nor the cleanup depends on the harness being alive (a SIGKILLed or OOM-killed evaluate.py
leaves nothing behind). In namespaces mode the supervisor is pid 1 and root, out of the program's
reach; in process mode it is a subreaper of the same uid, which a deliberately hostile program
can kill first (see docs/evaluation.md).

Never a fork of the model-holding process running untrusted code: `subprocess` exec's a fresh
interpreter (no preexec_fn, which is unsafe in a multi-threaded torch process). The environment
is minimal. A program passes only if the child wrote the per-run random nonce line, after all
tests ran, on a dedicated fd, with passed == total == the number of tests the harness sent.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger(__name__)

CHILD = Path(__file__).with_name("sandbox_child.py")
RUNNER_VERSION = "4"  # bump when the child's semantics change: it is part of the cache key
# Programs run with a fixed string-hash seed: a completion whose answer follows the order of a set
# of strings (`list(set(words))`) gets the same verdict every run, not a coin flip per execution.
MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
               "HOME": "/tmp", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONHASHSEED": "0"}
# The supervisor's own wall clock runs this much longer than the harness's wait, so that with a live
# harness the harness's timeout (verdict "timeout") fires first; without one, it is the hard limit.
SUPERVISOR_GRACE_S = 1.0
STOP_GRACE_S = 2.0  # how long the harness lets the supervisor clean up before killing its group


@functools.lru_cache(maxsize=None)
def interpreter_flags(python: str = sys.executable) -> tuple[str, ...]:
    """`-I` without its `-E`: no user site-packages (-s), no script directory on sys.path (-P),
    but the environment is read, so MINIMAL_ENV's PYTHONHASHSEED applies (MINIMAL_ENV, the child's
    whole environment, holds no other PYTHON* variable). -P needs Python >= 3.11; an older
    interpreter keeps -I, and with it a random hash seed per program."""
    if python == sys.executable:
        new = sys.version_info >= (3, 11)
    else:
        try:
            new = subprocess.run([python, "-P", "-c", "pass"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            new = False
    return ("-s", "-P") if new else ("-I",)


@dataclass
class SandboxConfig:
    workers: int = 2
    timeout_per_test: float = 3.0     # seconds per test (and for running the program's top level)
    timeout_total: float = 30.0       # wall clock for the whole program incl. interpreter start
    memory_mb: int = 2048             # RLIMIT_AS
    cpu_seconds: int = 30             # RLIMIT_CPU per process
    fsize_mb: int = 16                # RLIMIT_FSIZE: largest file (incl. stdout) the program may write
    nofile: int = 64                  # RLIMIT_NOFILE
    nproc: int = 32                   # RLIMIT_NPROC for the sandbox uid (namespaces mode)
    tmpfs_mb: int = 64                # size of each private tmpfs
    max_output_bytes: int = 1 << 20   # stdout compared for stdin tests
    isolation: str = "auto"           # auto | namespaces | process
    uid_base: int = 1_600_000_000     # uid of worker slot i = uid_base + i (no passwd entry needed)
    gid: int = 65534                  # nogroup
    python: str = field(default_factory=lambda: sys.executable)

    def fingerprint(self) -> dict:
        """What changes an outcome: part of the execution-cache key."""
        keys = ("timeout_per_test", "memory_mb", "cpu_seconds", "fsize_mb", "nofile", "nproc")
        return {k: getattr(self, k) for k in keys} | {"runner": RUNNER_VERSION}


@dataclass
class ExecResult:
    status: str                  # passed | failed | error | timeout | sandbox_error
    passed_tests: int
    total_tests: int
    seconds: float
    detail: str = ""
    exit_code: int | None = None
    stderr_tail: str = ""
    cached: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@functools.lru_cache(maxsize=None)
def probe_isolation(python: str = sys.executable) -> str:
    """`namespaces` if we can build the full sandbox here (root + unshare that works), else `process`."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return "process"
    try:
        r = subprocess.run([unshare, "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                            "--propagation", "private", python, "-I", "-c", "pass"],
                           capture_output=True, timeout=30, env=MINIMAL_ENV)
    except (OSError, subprocess.TimeoutExpired):
        return "process"
    return "namespaces" if r.returncode == 0 else "process"


def execution_key(program: str, tests: list, test_type: str, fingerprint: dict) -> str:
    blob = json.dumps([program, tests, test_type, fingerprint], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ExecutionCache:
    """Append-only JSONL of key -> result, so a rerun never executes the same program twice.
    Timeouts and sandbox errors are not cached: they depend on machine load, not on the program."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self._mem: dict[str, dict] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self._mem[rec["key"]] = rec["result"]
                except (ValueError, KeyError):
                    continue  # a torn last line after a crash: that program simply runs again
        self._fh = None
        self._lock = threading.Lock()  # put() is called from run_many's worker threads

    def get(self, key: str) -> ExecResult | None:
        rec = self._mem.get(key)
        return ExecResult(**rec, cached=True) if rec else None

    def put(self, key: str, result: ExecResult) -> None:
        if result.status in ("timeout", "sandbox_error"):
            return
        rec = {k: v for k, v in asdict(result).items() if k != "cached"}
        with self._lock:
            self._put(key, rec)

    def _put(self, key: str, rec: dict) -> None:
        self._mem[key] = rec
        if self.path:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a")
                # the cache is shared by concurrent evaluations, so a torn last line (a crashed
                # writer) is not cut but closed: the next record starts on its own line, and the
                # fragment is skipped when read (that program simply runs again)
                if self._fh.tell() > 0:
                    with open(self.path, "rb") as r:
                        r.seek(-1, 2)
                        if r.read(1) != b"\n":
                            self._fh.write("\n")
            self._fh.write(json.dumps({"key": key, "result": rec}) + "\n")
            self._fh.flush()

    def close(self):
        with self._lock:
            if self._fh:
                self._fh.close()
                self._fh = None


class Sandbox:
    def __init__(self, config: SandboxConfig | None = None, cache: ExecutionCache | None = None, **overrides):
        self.config = config or SandboxConfig(**overrides)
        want = self.config.isolation
        have = probe_isolation(self.config.python)
        if want == "namespaces" and have != "namespaces":
            raise RuntimeError("sandbox.isolation=namespaces needs root and a working `unshare` "
                               "(util-linux); use isolation=process to run without it")
        if want not in ("auto", "namespaces", "process"):
            raise ValueError(f"sandbox.isolation={want!r}: expected auto, namespaces or process")
        self.isolation = have if want == "auto" else want
        if self.isolation == "process":
            log.warning("sandbox isolation=process: no network/filesystem isolation, programs run as "
                        "uid %d. Only evaluate code you would run yourself.", os.getuid())
        self.cache = cache or ExecutionCache(None)
        self._slots: queue.Queue[int] = queue.Queue()
        for i in range(max(1, self.config.workers)):
            self._slots.put(i)

    # ------------------------------------------------------------------ one program
    def key(self, program: str, tests: list, test_type: str = "functional") -> str:
        """The execution-cache key: the program, its tests, the limits and the isolation mode (a
        program that writes to /tmp or opens a socket can pass in one mode and fail in the other)."""
        return execution_key(program, tests, test_type, {**self.config.fingerprint(), "isolation": self.isolation})

    def run(self, program: str, tests: list, test_type: str = "functional") -> ExecResult:
        if test_type not in ("functional", "stdin"):
            raise ValueError(f"test_type={test_type!r}: expected functional or stdin")
        key = self.key(program, tests, test_type)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        slot = self._slots.get()
        try:
            result = self._execute(program, tests, test_type, slot)
        finally:
            if self.isolation == "namespaces":
                # a killed sandbox's processes (zombies included) still count towards its uid's
                # RLIMIT_NPROC while the kernel tears them down: hand the slot on only once they
                # are gone, or the next program's fork could be refused
                _wait_for_uid_exit(self.config.uid_base + slot)
            self._slots.put(slot)
        self.cache.put(key, result)
        return result

    def _execute(self, program: str, tests: list, test_type: str, slot: int) -> ExecResult:
        cfg = self.config
        if not tests:
            return ExecResult("error", 0, 0, 0.0, detail="no tests: a program without tests never passes")
        nonce = secrets.token_hex(16)
        scratch = Path(tempfile.mkdtemp(prefix="domino-sbx-"))  # 0700, ours: job, result, logs
        started = time.monotonic()
        namespaced = self.isolation == "namespaces"
        budget = min(cfg.timeout_total, 2.0 + cfg.timeout_per_test * (len(tests) + 1))
        res_r, res_w = os.pipe()
        life_r, life_w = os.pipe()  # never written: its EOF tells the supervisor to stop
        harness_fd = _pidfd_of_self()  # readable once this process is gone, however it died
        proc = None
        try:
            job = {"program": program, "tests": tests, "test_type": test_type, "nonce": nonce,
                   "result_fd": res_w, "timeout_per_test": cfg.timeout_per_test,
                   "memory_mb": cfg.memory_mb, "cpu_seconds": cfg.cpu_seconds, "fsize_mb": cfg.fsize_mb,
                   "nofile": cfg.nofile, "nproc": cfg.nproc, "tmpfs_mb": cfg.tmpfs_mb,
                   "max_output_bytes": cfg.max_output_bytes, "namespace": namespaced,
                   "uid": cfg.uid_base + slot if namespaced else None, "gid": cfg.gid,
                   "lifeline_fd": life_r, "harness_pidfd": harness_fd if harness_fd >= 0 else None,
                   "wall_clock_s": budget + SUPERVISOR_GRACE_S}
            (scratch / "job.json").write_text(json.dumps(job))
            if namespaced:
                cmd = [shutil.which("unshare"), "--net", "--pid", "--fork", "--kill-child", "--mount-proc",
                       "--propagation", "private", cfg.python, *interpreter_flags(cfg.python), str(CHILD)]
                cwd = "/"
            else:
                work = scratch / "work"
                work.mkdir()
                cmd, cwd = [cfg.python, *interpreter_flags(cfg.python), str(CHILD)], str(work)
            with open(scratch / "job.json", "rb") as stdin, open(scratch / "stderr", "wb") as stderr:
                proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.DEVNULL, stderr=stderr,
                                        pass_fds=tuple(fd for fd in (res_w, life_r, harness_fd) if fd >= 0),
                                        cwd=cwd, env=MINIMAL_ENV, start_new_session=True, close_fds=True)
            for fd in (res_w, life_r, harness_fd):
                if fd >= 0:
                    os.close(fd)
            res_w = life_r = harness_fd = -1
            timed_out = False
            try:
                proc.wait(timeout=budget)
            except subprocess.TimeoutExpired:
                timed_out = True
            life_w, w = -1, life_w  # _stop closes it: never twice (another thread may reuse the number)
            _stop(proc, w)
            raw = _read_all(res_r)
            stderr_tail = (scratch / "stderr").read_bytes()[-2000:].decode("utf-8", "replace")
        finally:
            if proc is not None and proc.returncode is None:
                life_w, w = -1, life_w
                _stop(proc, w)
            for fd in (res_r, res_w, life_r, life_w, harness_fd):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            shutil.rmtree(scratch, ignore_errors=True)
        seconds = time.monotonic() - started
        return _judge(raw, nonce, len(tests), timed_out, proc.returncode, seconds, stderr_tail)

    # ------------------------------------------------------------------ many programs
    def run_many(self, jobs: Iterable[tuple[str, list, str]],
                 on_result: Callable[[int, ExecResult], Any] | None = None) -> list[ExecResult]:
        """Run (program, tests, test_type) jobs on `workers` threads (each waits on a subprocess).
        Identical jobs run once: the first gets the verdict, later copies get it as `cached`. (Run
        side by side, copies used to race for the cache: whether one executed again, and its
        `cached` flag, depended on thread timing.)"""
        jobs = list(jobs)
        results: list[ExecResult | None] = [None] * len(jobs)
        copies: dict[str, list[int]] = {}
        for i, job in enumerate(jobs):
            copies.setdefault(self.key(*job), []).append(i)
        with ThreadPoolExecutor(max_workers=max(1, self.config.workers)) as pool:
            futures = {pool.submit(self.run, *jobs[idx[0]]): idx for idx in copies.values()}
            for fut in _as_completed(futures):
                first, *rest = futures[fut]
                results[first] = fut.result()
                for i in [first] + rest:
                    if i != first:
                        results[i] = replace(results[first], cached=True)
                    if on_result:
                        on_result(i, results[i])
        return results  # type: ignore[return-value]


def _as_completed(futures):
    from concurrent.futures import as_completed
    return as_completed(futures)


def _uid_has_tasks(uid: int) -> bool:
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"Uid:"):
                        if int(line.split()[1]) == uid:
                            return True
                        break
        except OSError:  # the process ended while we looked
            continue
    return False


def _wait_for_uid_exit(uid: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _uid_has_tasks(uid):
        if time.monotonic() > deadline:
            log.warning("sandbox uid %d still has processes after %.0f s; reusing its slot", uid, timeout_s)
            return
        time.sleep(0.02)


def _pidfd_of_self() -> int:
    """A pidfd of this process (Linux >= 5.3), or -1. A fork of the harness (a data-loader worker,
    say) inherits the lifeline's write end and would keep it open after the harness died; the
    pidfd becomes readable when this process exits regardless."""
    try:
        return os.pidfd_open(os.getpid())
    except (AttributeError, OSError):
        return -1


def _stop(proc: subprocess.Popen, life_w: int) -> None:
    """Close the lifeline: the supervisor kills the sandbox (in process mode, the descendants that
    left our process group too) and exits. If it does not within STOP_GRACE_S, kill its group."""
    if life_w >= 0:
        try:
            os.close(life_w)
        except OSError:
            pass
    if proc.returncode is None:
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    proc.wait()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_all(fd: int, limit: int = 1 << 16) -> bytes:
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            b = os.read(fd, limit - size)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        size += len(b)
    return b"".join(chunks)


def _judge(raw: bytes, nonce: str, n_tests: int, timed_out: bool, returncode: int | None,
           seconds: float, stderr_tail: str) -> ExecResult:
    lines = [ln for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(nonce + " ")]
    if timed_out and not ours:
        return ExecResult("timeout", 0, n_tests, seconds, "global timeout", returncode, stderr_tail)
    if len(ours) != 1 or len(lines) != 1:
        if "Traceback" in stderr_tail and "sandbox_child.py" in stderr_tail \
                and "<program>" not in stderr_tail:
            return ExecResult("sandbox_error", 0, n_tests, seconds, "sandbox child crashed", returncode,
                              stderr_tail)
        why = "no result: the program exited before its tests completed" if not lines else \
            "result channel tampered with"
        return ExecResult("error", 0, n_tests, seconds, why, returncode, stderr_tail)
    try:
        passed_s, total_s, kind, where_s, msg_hex = ours[0][len(nonce) + 1:].split(" ")
        passed, total, _ = int(passed_s), int(total_s), int(where_s)
        message = bytes.fromhex(msg_hex).decode("utf-8", "replace")
    except ValueError:
        return ExecResult("error", 0, n_tests, seconds, "malformed result line", returncode, stderr_tail)
    if kind == "passed" and passed == total == n_tests:
        return ExecResult("passed", passed, n_tests, seconds, "", returncode, stderr_tail)
    status = {"timeout": "timeout", "error": "error", "failed": "failed"}.get(kind, "error")
    detail = message or f"{passed}/{n_tests} tests reported passing"
    return ExecResult(status, min(passed, n_tests), n_tests, seconds, detail, returncode, stderr_tail)
