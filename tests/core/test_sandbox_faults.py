"""Faults around the sandbox (issue #14, defect 2): untrusted code must not outlive the harness.

Each test starts a small harness (a subprocess calling `Sandbox.run`) whose program renames itself
(comm, via prctl(PR_SET_NAME)) to a token unique to the test: that finds it by scanning /proc in
both modes, including inside a pid namespace (where its own pid means nothing to us) and after it
setsid()s or double-forks. Then the harness is SIGKILLed (as an OOM kill or `kill -9` of
evaluate.py would) or frozen (SIGSTOP: the harness is alive but no longer enforcing anything), and
every sandboxed process, and every process the harness had started, must be gone in time.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from domino.core.sandbox import SUPERVISOR_GRACE_S, Sandbox, SandboxConfig, probe_isolation

MODES = ["process"] + (["namespaces"] if probe_isolation() == "namespaces" else [])
UID_BASE = 1_600_100_000  # not test_sandbox's: the two files may run side by side

HARNESS = """
import sys
from domino.core.sandbox import Sandbox, SandboxConfig
mode, per_test, total, program = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
sb = Sandbox(SandboxConfig(workers=1, isolation=mode, timeout_per_test=per_test, timeout_total=total,
                           memory_mb=512, uid_base=%d))
print(sb.run(program, ["assert True"]), flush=True)
""" % UID_BASE

# {token} renames the process; the SIGALRM line (in some programs) disables the per-test alarm, so
# that only a wall clock the program cannot touch ends it.
SLEEPER = """
import ctypes, os, signal, time
ctypes.CDLL(None).prctl(15, {token!r}.encode(), 0, 0, 0)
{alarm}
time.sleep(60)
"""
DAEMON = """
import ctypes, os, signal, time
ctypes.CDLL(None).prctl(15, {token!r}.encode(), 0, 0, 0)
{alarm}
if os.fork() == 0:
    os.setsid()            # out of the sandbox's process group and session
    if os.fork() == 0:
        time.sleep(60)     # orphaned grandchild, reparented away from the program
    os._exit(0)
time.sleep(60)
"""
PROGRAMS = {"sleeper": (SLEEPER, 1), "setsid-daemon": (DAEMON, 2)}  # program, live token processes
IGNORE_ALARM = "signal.signal(signal.SIGALRM, signal.SIG_IGN)"


@pytest.fixture(autouse=True)
def _harness_temp_dir(tmp_path, monkeypatch):
    """A harness killed on purpose cannot remove its scratch directory (the job and the program's
    stderr): the harness subprocesses make theirs under this test's tmp_path, not in /tmp."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def _procs():
    """pid -> (ppid, state, starttime, comm) of every process, read from /proc/<pid>/stat."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read().decode("utf-8", "replace")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = (int(rest[1]), rest[0], int(rest[19]), comm)
    return out


def _live(procs, ident):
    """Those of `ident` ((pid, starttime) pairs) still running (zombies hold nothing but a pid)."""
    return {(p, st) for p, st in ident if p in procs and procs[p][2] == st and procs[p][1] not in "ZX"}


def _token_procs(procs, token):
    return {(p, v[2]) for p, v in procs.items() if v[3] == token and v[1] not in "ZX"}


def _descendants(procs, root):
    kids, frontier = set(), [root]
    while frontier:
        parent = frontier.pop()
        for p, v in procs.items():
            if v[0] == parent and (p, v[2]) not in kids:
                kids.add((p, v[2]))
                frontier.append(p)
    return kids


def _start(mode, program, per_test, total, n_expected):
    """Start a harness running `program`; wait until its `n_expected` token processes run.
    Returns (harness, token, every sandbox process: the token ones and the harness's descendants)."""
    token = "dsbx" + uuid.uuid4().hex[:11]  # comm holds 15 characters
    src = textwrap.dedent(program).format(token=token, alarm=IGNORE_ALARM)
    harness = subprocess.Popen([sys.executable, "-c", HARNESS, mode, str(per_test), str(total), src],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 15
    while True:
        procs = _procs()
        found = _token_procs(procs, token)
        if len(found) >= n_expected and all(procs[p][1] not in "ZX" for p, _ in found):
            break
        if harness.poll() is not None or time.monotonic() > deadline:
            _cleanup(harness, token)
            out, err = harness.communicate()
            pytest.fail(f"sandboxed program never started ({len(found)} of {n_expected} processes): "
                        f"{out.decode()} {err.decode()[-2000:]}")
        time.sleep(0.02)
    time.sleep(0.2)  # let the daemon's intermediate parent exit: its child is then an orphan
    procs = _procs()
    return harness, token, _token_procs(procs, token) | _descendants(procs, harness.pid)


def _wait_gone(ident, token, within_s):
    """Seconds until none of `ident` and no `token` process runs, or fail after `within_s`."""
    started = time.monotonic()
    while True:
        procs = _procs()
        left = _live(procs, ident) | _token_procs(procs, token)
        if not left:
            return time.monotonic() - started
        if time.monotonic() - started > within_s:
            desc = {p: procs[p] for p, _ in left if p in procs}
            pytest.fail(f"{len(left)} sandbox process(es) outlived the harness by {within_s}s: {desc}")
        time.sleep(0.05)


def _cleanup(harness, token):
    """Never leave a test's processes behind, whatever the code under test did."""
    try:
        harness.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    harness.wait()
    for p in _token_procs(_procs(), token):
        try:
            os.kill(p[0], signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", MODES)
def test_nothing_survives_a_killed_harness(mode, program):
    """SIGKILL of the harness mid-run (generous limits: nothing would end the program for 60 s)."""
    source, n = PROGRAMS[program]
    harness, token, sandboxed = _start(mode, source, 60, 60, n)
    try:
        assert _live(_procs(), sandboxed), "nothing was running before the kill"
        harness.send_signal(signal.SIGKILL)
        harness.wait()
        _wait_gone(sandboxed, token, within_s=3.0)
    finally:
        _cleanup(harness, token)


@pytest.mark.parametrize("program", PROGRAMS)
@pytest.mark.parametrize("mode", MODES)
def test_wall_clock_holds_without_the_harness(mode, program):
    """The harness is frozen (alive, so its death is not what ends the program) and the program
    has disabled its per-test alarm: only the sandbox's own wall clock can stop it."""
    source, n = PROGRAMS[program]
    total = 2.0
    started = time.monotonic()
    harness, token, sandboxed = _start(mode, source, 30, total, n)
    try:
        harness.send_signal(signal.SIGSTOP)
        # the supervisor's clock starts before the program does: total + grace from `started`
        # bounds it; 2.5 s of slack for interpreter start and a loaded machine
        _wait_gone(sandboxed, token, within_s=total + SUPERVISOR_GRACE_S + 2.5)
        assert time.monotonic() - started < total + SUPERVISOR_GRACE_S + 5.0
    finally:
        _cleanup(harness, token)


@pytest.mark.parametrize("mode", MODES)
def test_setsid_daemon_is_killed_with_a_live_harness(mode):
    """The ordinary path: the harness's timeout ends the run, and the program's setsid() daemon
    (out of the process group the harness used to kill) goes with it, in process mode too."""
    token = "dsbx" + uuid.uuid4().hex[:11]
    sb = Sandbox(SandboxConfig(workers=1, isolation=mode, timeout_per_test=1.0, timeout_total=2.0,
                               memory_mb=512, uid_base=UID_BASE))
    try:
        r = sb.run(textwrap.dedent(DAEMON).format(token=token, alarm=IGNORE_ALARM), ["assert True"])
        assert r.status == "timeout", r
        _wait_gone(set(), token, within_s=1.0)
    finally:
        for p in _token_procs(_procs(), token):
            os.kill(p[0], signal.SIGKILL)
