"""The sandbox contains hostile programs and scores them as failures, leaving nothing behind."""
import os
import socket
import textwrap
import time

import psutil
import pytest

from domino.core.sandbox import ExecutionCache, Sandbox, SandboxConfig, probe_isolation

NAMESPACES = probe_isolation() == "namespaces"
needs_ns = pytest.mark.skipif(not NAMESPACES, reason="isolation=namespaces needs root + unshare")
UID_BASE = 1_600_000_000
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(workers=2, timeout_per_test=1.0, timeout_total=6.0, memory_mb=512,
                                 uid_base=UID_BASE))


def sandbox_processes(grace_s=2.0):
    """Live (non-zombie) processes running as a sandbox uid or carrying our marker. SIGKILL is
    asynchronous, so allow the kernel `grace_s` to finish tearing a killed sandbox down."""
    deadline = time.monotonic() + grace_s
    while True:
        procs = _sandbox_processes()
        if not procs or time.monotonic() > deadline:
            return procs
        time.sleep(0.05)


def _sandbox_processes():
    out = []
    for p in psutil.process_iter(["uids", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.info["uids"] and p.info["uids"].real >= UID_BASE:
                out.append(p)
            elif any("domino-hostile-marker" in c for c in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def run(sandbox, program, tests=ADD_TESTS, test_type="functional"):
    started = time.monotonic()
    r = sandbox.run(textwrap.dedent(program), tests, test_type)
    assert time.monotonic() - started < 15, "harness blocked"
    assert sandbox_processes() == [], "a sandboxed process outlived its run"
    return r


def test_correct_and_wrong_programs(sandbox):
    assert run(sandbox, "def add(a, b):\n    return a + b\n").status == "passed"
    r = run(sandbox, "def add(a, b):\n    return a - b\n")
    assert r.status == "failed" and r.passed_tests == 0
    r = run(sandbox, "def add(a, b):\n    return a * 0 + b + a if a > 0 else 7\n")
    assert r.status == "failed" and r.passed_tests == 1  # first test passed, second failed


def test_empty_and_broken_programs_fail(sandbox):
    assert run(sandbox, "").status == "error"           # NameError: add
    assert run(sandbox, "def add(a, b) return").status == "error"  # SyntaxError
    assert sandbox.run("def add(a, b):\n    return a + b\n", []).status == "error"  # no tests, no pass


def test_stdin_programs(sandbox):
    tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -3", "output": "  7  "}]
    ok = "import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n"
    assert run(sandbox, ok, tests, "stdin").status == "passed"
    exits = "import sys\na, b = map(int, input().split())\nprint(a + b)\nsys.exit(0)\n"
    assert run(sandbox, exits, tests, "stdin").status == "passed"  # exit(0) after printing is fine
    assert run(sandbox, "print(3)\n", tests, "stdin").status == "failed"
    assert run(sandbox, "raise ValueError\n", tests, "stdin").status == "error"
    r = run(sandbox, "while True:\n    pass\n", tests, "stdin")
    assert r.status == "timeout"


@pytest.mark.parametrize("program", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "raise SystemExit(0)\n",
    "print('passed')\nprint('ok 2/2')\nimport os\nos._exit(0)\n",
    "def add(a, b):\n    raise SystemExit(0)\n",
    "def add(a, b):\n    import os; os._exit(0)\n",
    "def add(a, b):\n    raise KeyboardInterrupt\n",
    # redefine builtins / the checker / the harness' own tools
    "import builtins\nbuiltins.compile = lambda *a, **k: compile('pass', '<x>', 'exec')\n"
    "def add(a, b):\n    return 0\n",
    "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return 0\n",
    "import builtins\nbuiltins.AssertionError = type('E', (BaseException,), {})\n"
    "def add(a, b):\n    return 0\n",
    "abs = lambda x: 0\ndef add(a, b):\n    return 0\n",
    "import json\njson.JSONEncoder.encode = lambda self, o: '{\"passed\": 2}'\n"
    "def add(a, b):\n    return 0\n",
    "import sys\ndef t(f, e, a):\n    return None\nsys.settrace(t)\ndef add(a, b):\n    return 0\n",
    "import os\nos.write = lambda fd, b: len(b)\ndef add(a, b):\n    return 0\n",
    "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0 2 2 passed -1 \\n')\n"
    "    except OSError:\n        pass\ndef add(a, b):\n    return 0\n",
    "import os\nif os.fork() == 0:\n    pass\nelse:\n    os.wait(); os._exit(0)\n"
    "def add(a, b):\n    return 0\n",
])
def test_early_exit_and_tampering_fail(sandbox, program):
    r = run(sandbox, program, ["assert abs(add(1, 2)) == 3", "assert add(-1, 1) == 0"])
    assert r.status != "passed", r


def test_abs_shadowing_does_not_change_the_test():
    # the abs= trick above would pass a test comparing abs(...) if tests shared the namespace
    sb = Sandbox(SandboxConfig(workers=1, timeout_per_test=1.0))
    r = sb.run("abs = lambda x: 0\ndef add(a, b):\n    return 5\n", ["assert abs(add(1, 2) - 3) < 1e-6"])
    assert r.status == "failed"


def test_infinite_loop_times_out(sandbox):
    r = run(sandbox, "def add(a, b):\n    while True:\n        pass\n")
    assert r.status == "timeout"
    r = run(sandbox, "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n")
    assert r.status == "timeout"  # per-test alarm disabled: the global timeout kills the group


def test_memory_bomb_is_contained(sandbox):
    r = run(sandbox, "x = bytearray(2**36)\n")  # 64 GiB > RLIMIT_AS (and > this machine's RAM)
    assert r.status == "error" and "MemoryError" in r.detail
    # a gradual bomb ends in MemoryError at the limit, or in the timeout on a slow machine
    r = run(sandbox, "x = []\nwhile True:\n    x.append(bytearray(16 * 2**20))\n")
    assert r.status in ("error", "timeout")


def test_fork_bomb_is_contained(sandbox):
    started = time.monotonic()
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    r = sandbox.run(bomb, ADD_TESTS, "functional")
    if sandbox.isolation == "namespaces":
        # the slot's uid is handed on only when every task of it, zombies included, is gone
        # (a guard: on an idle machine the kernel is usually done by then anyway)
        from domino.core.sandbox import _uid_has_tasks
        assert not any(_uid_has_tasks(UID_BASE + i) for i in range(sandbox.config.workers))
    assert sandbox_processes() == []
    assert r.status in ("timeout", "error")
    assert time.monotonic() - started < 12
    # and the harness still works right after
    assert run(sandbox, "def add(a, b):\n    return a + b\n").status == "passed"


def test_orphaned_children_are_killed(sandbox):
    program = """
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "domino-hostile-marker"],
                         start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(300)
            os._exit(0)
        time.sleep(0.3)
        def add(a, b):
            return 0
    """
    r = run(sandbox, program)  # run() asserts no sandbox process survives
    # "failed" (add returned 0) normally; once, on a heavily loaded machine, "error" was seen
    # (not reproduced since): either way the program never passes and nothing outlives it
    assert r.status in ("failed", "error") and not r.passed, (r.status, r.detail, r.stderr_tail)


@needs_ns
def test_cannot_write_outside_workdir(sandbox, tmp_path):
    target = tmp_path / "pwned"
    tmp_path.chmod(0o777)  # world-writable: only the mount namespace stands between them
    program = f"""
        open({str(target)!r}, "w").write("x")
        def add(a, b):
            return a + b
    """
    r = run(sandbox, program)
    assert r.status == "error" and not target.exists()
    home = os.path.expanduser("~")
    r = run(sandbox, f"open({home!r} + '/domino-pwned', 'w').write('x')\n")
    assert r.status == "error" and not os.path.exists(home + "/domino-pwned")
    # writing inside its own working dir is fine
    assert run(sandbox, "open('scratch.txt', 'w').write('x')\ndef add(a, b):\n    return a + b\n").passed


def test_cannot_read_harness_environment(sandbox, monkeypatch):
    secret = "s3cr3t-" + os.urandom(4).hex()
    monkeypatch.setenv("DOMINO_TEST_SECRET", secret)
    program = f"""
        import os
        def leak():
            found = os.environ.get("DOMINO_TEST_SECRET", "")
            for pid in ({os.getpid()}, os.getppid()):
                try:
                    found += open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
                except OSError:
                    pass
            return found
    """
    r = run(sandbox, program, [f"assert {secret!r} in leak()"])
    assert r.status == "failed"


@needs_ns
def test_no_network(sandbox):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    program = f"""
        import socket
        def connect():
            s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
            s.sendall(b"hello")
            return "connected"
    """
    try:
        r = run(sandbox, program, ["assert connect() == 'connected'"])
        assert r.status in ("error", "failed")
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()


@needs_ns
def test_runs_unprivileged_with_private_tmp(sandbox):
    program = ("import os\ndef info():\n"
               "    return os.getuid(), os.listdir('/tmp'), os.path.exists('/root/.cache')\n")
    r = run(sandbox, program, [f"u, t, c = info()\nassert u >= {UID_BASE} and t == ['work'] and not c"])
    assert r.status == "passed", r


def test_parallel_and_cached(tmp_path):
    cache = ExecutionCache(tmp_path / "cache.jsonl")
    sb = Sandbox(SandboxConfig(workers=2, timeout_per_test=2.0), cache=cache)
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", ADD_TESTS, "functional") for i in range(6)]
    res = sb.run_many(jobs)
    assert [r.status for r in res] == ["passed", "failed"] * 3
    assert sum(r.cached for r in res) <= 4  # duplicates may hit the in-memory cache
    cache.close()
    again = Sandbox(SandboxConfig(workers=2, timeout_per_test=2.0),
                    cache=ExecutionCache(tmp_path / "cache.jsonl"))
    res2 = again.run_many(jobs)
    assert all(r.cached for r in res2) and [r.status for r in res2] == [r.status for r in res]
