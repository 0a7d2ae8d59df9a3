"""The trusted half of the sandbox: runs inside the fresh interpreter, *before* any untrusted code.

Started by `sandbox.Sandbox` as `python -s -P sandbox_child.py` (`-I` less `-E`, so the fixed
PYTHONHASHSEED of its minimal environment applies; stdlib only, no domino import). It reads one
job (JSON) from stdin and becomes the sandbox's *supervisor*:

1. in namespace mode (it is pid 1 of fresh pid/net/mount namespaces, still root): mounts private
   tmpfs over /tmp, /var/tmp, /dev/shm, hides directories the sandbox user cannot traverse
   (re-exposing only the interpreter's own directories), creates the working dir /tmp/work;
   in process mode it makes itself a child subreaper, so orphans of the program reparent to it;
2. forks the *worker*, which lowers resource limits (address space, CPU, file size, open files,
   processes, core), drops privileges to the job's uid/gid (no supplementary groups,
   no_new_privs), re-arms PR_SET_PDEATHSIG (a uid change clears it) and checks its parent is still
   the supervisor, runs the program and its tests, and, only after the last test, writes
   `<nonce> <result>` to the result fd (inherited from the harness, never on stdout) using
   functions captured at import, then `os._exit`;
3. the supervisor never runs untrusted code. It waits for the worker, the job's hard wall clock
   (`wall_clock_s`, counted from its own start) and the harness: the `lifeline_fd` pipe (EOF when
   the harness closes it or dies) and `harness_pidfd` (readable when the harness process exits,
   even if a fork of the harness still holds the pipe). On whichever comes first it SIGKILLs every
   other sandboxed process (namespace: `kill(-1)` from pid 1, and its exit makes the kernel kill
   the rest; process mode: every descendant, reparented to it as they orphan) and exits with the
   worker's status (128 + signal when killed). So the time limit and the cleanup hold without the
   harness: a SIGKILLed or OOM-killed harness leaves nothing running.

Everything the untrusted code could tamper with (builtins, sys.exit, os.write, the test helpers)
is captured as locals here first; an early exit, SystemExit, a printed "success" line or a
redefined checker therefore cannot produce a result line. Code that deliberately walks this
module's frames to find the nonce can still forge one: that needs per-test process separation
(done for stdin tests, where the untrusted code only ever runs in a forked child).
"""
import builtins
import ctypes
import io
import json
import os
import resource
import select
import signal
import sys
import time

_write, _exit, _getpid, _kill, _fork, _waitpid = os.write, os._exit, os.getpid, os.kill, os.fork, os.waitpid
_isinstance, _type, _len = isinstance, type, len
_abs, _max, _all, _zip, _float = abs, max, all, zip, float
_LIST, _TUPLE, _DICT, _STR, _INT, _FLOAT, _BOOL = list, tuple, dict, str, int, float, bool
_scan_once = json.scanner.c_make_scanner(json.JSONDecoder()) if json.scanner.c_make_scanner else None
_BaseException, _repr, _str = BaseException, repr, str
_compile, _exec, _dict, _setitimer = compile, exec, dict, signal.setitimer
_settrace, _setprofile = sys.settrace, sys.setprofile
_BUILTINS = builtins.__dict__
_BUILTINS_SNAPSHOT = dict(_BUILTINS)  # restored before every test: a solution cannot redefine abs()

MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE = 2, 38, 4
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
WORKDIR = "/tmp/work"
_IN_NAMESPACE = False  # set by main(): kill(-1) is only ever sent inside our own pid namespace


class TestTimeout(BaseException):
    """A BaseException so that `except Exception` in the solution does not swallow it."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _mount(libc, src, target, fstype, flags, data=None):
    if libc.mount(src.encode() if src else None, target.encode(), fstype.encode() if fstype else None,
                  flags, data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} -> {target}: {os.strerror(err)}")


def _hidden_ancestors(paths, uid):
    """Ancestors of `paths` that `uid` could not traverse (e.g. /root 0700 holding a pyenv python)."""
    out = {}
    for p in paths:
        parts = os.path.abspath(p).split("/")
        for i in range(2, len(parts)):
            anc = "/".join(parts[:i])
            st = os.stat(anc)
            if not (st.st_mode & 0o001) and not (st.st_uid == uid and st.st_mode & 0o100):
                out.setdefault(anc, set()).add(os.path.abspath(p))
                break
    return out


def setup_namespace(job):
    """Private /tmp, /var/tmp, /dev/shm; hide untraversable dirs but keep the interpreter usable."""
    libc = _libc()
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    tmp_opts = f"size={int(job['tmpfs_mb'])}m,mode=1777"
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, tmp_opts)
    uid = job.get("uid")
    if uid is not None:
        expose = [p for p in {sys.base_prefix, sys.prefix, os.path.dirname(os.path.abspath(__file__)),
                              *[p for p in sys.path if p and os.path.isdir(p)]} if os.path.isdir(p)]
        for n, (anc, keep) in enumerate(sorted(_hidden_ancestors(expose, uid).items())):
            # keep only the outermost of nested paths, stage them, cover `anc`, bind them back
            keep = sorted(k for k in keep if not any(k != o and k.startswith(o + "/") for o in keep))
            stages = []
            for i, k in enumerate(keep):
                stage = f"/tmp/.stage{n}_{i}"
                os.mkdir(stage)
                _mount(libc, k, stage, None, MS_BIND | MS_REC)
                stages.append((stage, k))
            _mount(libc, "tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for stage, k in stages:
                os.makedirs(k, exist_ok=True)
                _mount(libc, stage, k, None, MS_BIND | MS_REC)
                libc.umount2(stage.encode(), MNT_DETACH)
                os.rmdir(stage)
    os.mkdir(WORKDIR, 0o700)
    if uid is not None:
        os.chown(WORKDIR, uid, job["gid"])
    os.chdir(WORKDIR)


def set_limits(job):
    mb = 1024 * 1024
    limits = [(resource.RLIMIT_CORE, 0)]
    if job.get("memory_mb"):
        limits.append((resource.RLIMIT_AS, int(job["memory_mb"]) * mb))
    if job.get("cpu_seconds"):
        limits.append((resource.RLIMIT_CPU, int(job["cpu_seconds"])))
    if job.get("fsize_mb"):
        limits.append((resource.RLIMIT_FSIZE, int(job["fsize_mb"]) * mb))
    if job.get("nofile"):
        limits.append((resource.RLIMIT_NOFILE, int(job["nofile"])))
    if job.get("nproc") and job.get("uid") is not None:  # counted per real uid: only meaningful when
        limits.append((resource.RLIMIT_NPROC, int(job["nproc"])))  # the uid is ours alone
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def drop_privileges(job):
    libc = _libc()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if job.get("uid") is None:
        return
    os.setgroups([])
    os.setgid(job["gid"])
    os.setuid(job["uid"])
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace / /proc/<pid>/fd from sibling processes
    if os.getuid() != job["uid"] or os.geteuid() != job["uid"]:
        raise RuntimeError("privilege drop failed")


def _loads(text):
    """json.loads through a scanner captured at start-up: patching json.* cannot change the result."""
    text = text.strip()
    if _scan_once is None:
        return json.loads(text)
    obj, end = _scan_once(text, 0)
    if end != _len(text):
        raise ValueError("trailing data after JSON value")
    return obj


def _canon(x):
    """Plain JSON-like value or raise: result objects with a forged __eq__ cannot compare equal."""
    t = _type(x)
    if t is _TUPLE or t is _LIST:
        return [_canon(v) for v in x]
    if t is _DICT:
        return {(k if _type(k) is _STR else _canon(k)): _canon(v) for k, v in x.items()}
    if t is _STR or t is _INT or t is _FLOAT or t is _BOOL or x is None:
        return x
    raise TypeError(f"unsupported result type {t.__name__}")


def _equal(a, b):
    ta, tb = _type(a), _type(b)
    if ta is _FLOAT or tb is _FLOAT:
        num = (_INT, _FLOAT)
        return ta in num and tb in num and _abs(a - b) <= 1e-9 * _max(1.0, _abs(b))
    if ta is _LIST and tb is _LIST:
        return _len(a) == _len(b) and _all(_equal(x, y) for x, y in _zip(a, b))
    if ta is _DICT and tb is _DICT:
        return a.keys() == b.keys() and _all(_equal(a[k], b[k]) for k in a)
    return ta is tb and a == b


def _call_json(fn, args_json, expected_json):
    """LiveCodeBench functional test: one JSON value per line of `args_json`, compare with `expected`."""
    args = [_loads(line) for line in args_json.split("\n") if line.strip()]
    want = _canon(_loads(expected_json))
    got = _canon(fn(*args))
    if not _equal(got, want):
        raise AssertionError(f"expected {_repr(want)[:200]}, got {_repr(got)[:200]}")


def _restore_interpreter():
    _settrace(None)  # a trace function could jump over a test's assert statements
    _setprofile(None)
    _BUILTINS.clear()
    _BUILTINS.update(_BUILTINS_SNAPSHOT)


def run_functional(job, deadline_s):
    """The program, then each test snippet; stops at the first failing test.

    Each test runs in a fresh namespace holding the program's names *except* those shadowing a
    builtin (a top-level `abs = ...` must not change what the test's own `abs` means), with the
    builtins module restored and the harness helpers injected after the program ran."""
    entry = job.get("entry_point")
    helpers = {"__domino_call_json": _call_json}
    g = {"__name__": "__solution__", "__builtins__": builtins}
    failure, passed = None, 0
    signal.signal(signal.SIGALRM, _on_alarm)
    units = [("program", job["program"])] + [(f"test {i}", t) for i, t in enumerate(job["tests"])]
    for idx, (label, src) in enumerate(units):
        try:
            _setitimer(signal.ITIMER_REAL, deadline_s)
            if idx == 0:
                _exec(_compile(src, "<program>", "exec"), g)
            else:
                _restore_interpreter()
                ns = {k: v for k, v in g.items() if k not in _BUILTINS_SNAPSHOT or k == entry}
                ns.update(helpers)
                ns["__builtins__"] = builtins
                ns["__name__"] = "__test__"
                _exec(_compile(src, f"<{label}>", "exec"), ns)
            _setitimer(signal.ITIMER_REAL, 0)
            if idx:
                passed += 1
        except TestTimeout:
            failure = ("timeout", idx, f"{label} exceeded {deadline_s}s")
        except _BaseException as e:  # SystemExit / KeyboardInterrupt inside a test are failures too
            _setitimer(signal.ITIMER_REAL, 0)
            kind = "failed" if _type(e) is AssertionError else "error"
            failure = (kind, idx, f"{label}: {_type(e).__name__}: {_str(e)[:300]}")
        if failure:
            break
    _restore_interpreter()
    return passed, failure


def _tokens_equal(out, expected):
    """Whitespace-tolerant comparison (as contest judges do): token sequences must match."""
    a, b = out.split(), expected.split()
    if a == b:
        return True
    if _len(a) != _len(b):
        return False
    for x, y in zip(a, b):
        if x != y:
            try:
                if abs(float(x) - float(y)) > 1e-6 * max(1.0, abs(float(y))):
                    return False
            except ValueError:
                return False
    return True


def _kill_stragglers():
    if _IN_NAMESPACE:  # the worker's uid owns nothing outside this pid namespace but the sandbox
        try:
            _kill(-1, signal.SIGKILL)
        except OSError:
            pass
    while True:
        try:
            if _waitpid(-1, os.WNOHANG) == (0, 0):
                break
        except ChildProcessError:
            break


def run_stdin(job, deadline_s, max_output):
    """Each test in a forked child with real fds 0/1/2; the comparison happens here, in the parent."""
    code = compile(job["program"], "<program>", "exec")  # SyntaxError counts as an error
    passed, failure = 0, None
    for i, test in enumerate(job["tests"]):
        with open("stdin.txt", "w") as fh:
            fh.write(test["input"])
        pid = _fork()
        if pid == 0:
            status = 1
            try:
                os.setpgid(0, 0)
                fd_in = os.open("stdin.txt", os.O_RDONLY)
                fd_out = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                fd_err = os.open(os.devnull, os.O_WRONLY)
                for src, dst in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
                    os.dup2(src, dst)
                os.close(job["result_fd"])
                sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
                sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False))
                try:
                    exec(code, {"__name__": "__main__", "__builtins__": builtins})
                    status = 0
                except SystemExit as e:  # exit(0) after printing is normal in contest code
                    status = 0 if e.code is None else (e.code if _type(e.code) is int else 1)
                sys.stdout.flush()
            finally:
                _exit(status if _type(status) is int and 0 <= status < 256 else 1)
        timed_out = False
        signal.signal(signal.SIGALRM, _on_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, deadline_s)
            _, wstatus = _waitpid(pid, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
        except TestTimeout:
            timed_out, wstatus = True, -1
        try:
            _kill(-pid, signal.SIGKILL)
        except OSError:
            pass
        _kill_stragglers()
        if timed_out:
            failure = ("timeout", i + 1, f"test {i} exceeded {deadline_s}s")
            break
        if not os.WIFEXITED(wstatus) or os.WEXITSTATUS(wstatus) != 0:
            failure = ("error", i + 1, f"test {i}: runtime error (wait status {wstatus})")
            break
        with open("stdout.txt", "rb") as fh:
            out = fh.read(max_output).decode("utf-8", "replace")
        if not _tokens_equal(out, test["output"]):
            failure = ("failed", i + 1, f"test {i}: wrong answer: got {out[:120]!r}, "
                       f"expected {test['output'][:120]!r}")
            break
        passed += 1
    return passed, failure


def _arm_parent_death(libc, parent_pid):
    """SIGKILL this process when its parent dies. Armed after the uid change (which clears it); the
    getppid() check closes the race where the parent died before the arming."""
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent_pid:
        _exit(1)


def run_worker(job, supervisor_pid):
    """The forked worker: limits, privilege drop, the program and its tests, the result line."""
    my_pid = _getpid()
    nonce, result_fd = _str(job["nonce"]), int(job["result_fd"])
    set_limits(job)
    drop_privileges(job)
    _arm_parent_death(_libc(), supervisor_pid)
    import random
    random.seed(0)  # a program drawing from `random` unseeded gets the same numbers every run
    if job["test_type"] == "stdin":
        try:
            passed, failure = run_stdin(job, float(job["timeout_per_test"]), int(job["max_output_bytes"]))
        except _BaseException as e:
            passed, failure = 0, ("error", 0, f"program: {_type(e).__name__}: {e}")
    else:
        passed, failure = run_functional(job, float(job["timeout_per_test"]))
    if _getpid() != my_pid:  # a fork of the solution reached here: only the original reports
        _exit(1)
    # Built from ints and str.encode only: no json/str method the solution could have patched.
    kind, where, message = failure if failure else ("passed", -1, "")
    line = (f"{nonce} {passed:d} {_len(job['tests']):d} {kind} {where:d} "
            f"{_str.encode(_str(message), 'utf-8', 'replace').hex()}\n")
    _write(result_fd, line.encode())
    for stream in (sys.stdout, sys.stderr):  # diagnostics only; the verdict is already written
        try:
            stream.flush()
        except _BaseException:
            pass
    _exit(0)


def _children(pid):
    """Pids whose parent is `pid` (scans /proc: /proc/<pid>/task/*/children is not always built)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # gone while we looked
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if _len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(name))
    return out


def _kill_descendants(timeout_s=5.0):
    """Process mode: SIGKILL every descendant. As a subreaper we inherit each orphan when its
    parent dies, so killing our children until none is left reaches setsid()/double-forked ones."""
    me, end = _getpid(), time.monotonic() + timeout_s
    while time.monotonic() < end:
        kids = _children(me)
        for pid in kids:
            try:
                _kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            pid, _ = _waitpid(-1, 0 if kids else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)


def _kill_sandbox():
    if _IN_NAMESPACE:  # pid 1, root: everything else in this pid namespace; our exit does the rest
        try:
            _kill(-1, signal.SIGKILL)
        except OSError:
            pass
    else:
        _kill_descendants()


def supervise(job, worker_pid):
    """Wait for the worker, the wall clock or the harness's end, then kill the rest of the sandbox.
    Returns the worker's wait status, or None when the worker had to be killed."""
    watch = [int(job[k]) for k in ("lifeline_fd", "harness_pidfd") if job.get(k) is not None]
    deadline = time.monotonic() + float(job["wall_clock_s"]) if job.get("wall_clock_s") else None
    try:
        worker_fd = os.pidfd_open(worker_pid)
    except (AttributeError, OSError):
        worker_fd = None  # no pidfd (Linux < 5.3): poll the worker every 10 ms instead
    poller = select.poll()
    for fd in watch + ([worker_fd] if worker_fd is not None else []):
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    status = None
    while True:
        pid, wstatus = _waitpid(worker_pid, os.WNOHANG)
        if pid == worker_pid:
            status = wstatus
            break
        timeout_ms = None if worker_fd is not None else 10
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            left_ms = int(left * 1000) + 1
            timeout_ms = left_ms if timeout_ms is None else min(left_ms, timeout_ms)
        events = poller.poll(timeout_ms)
        if any(fd in watch for fd, _ in events):  # harness closed the lifeline or is gone
            break
    _kill_sandbox()
    if status is None:
        try:
            _waitpid(worker_pid, 0)
        except ChildProcessError:
            pass
    return status


def main():
    global _IN_NAMESPACE
    job = json.loads(sys.stdin.buffer.read())
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    _IN_NAMESPACE = bool(job.get("namespace"))
    if _IN_NAMESPACE:
        setup_namespace(job)
    else:
        _libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    supervisor_pid = _getpid()
    worker_pid = _fork()
    if worker_pid == 0:
        try:
            for k in ("lifeline_fd", "harness_pidfd"):
                if job.get(k) is not None:
                    os.close(int(job[k]))
            run_worker(job, supervisor_pid)  # never returns
        except _BaseException:
            import traceback
            traceback.print_exc()  # a crash of the trusted code is reported as sandbox_error
            sys.stderr.flush()
        _exit(1)
    os.close(int(job["result_fd"]))
    status = supervise(job, worker_pid)
    if status is None:
        code = 128 + signal.SIGKILL
    elif os.WIFSIGNALED(status):
        code = 128 + os.WTERMSIG(status)
    else:
        code = os.WEXITSTATUS(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except _BaseException:
            pass
    _exit(code)


if __name__ == "__main__":
    main()
