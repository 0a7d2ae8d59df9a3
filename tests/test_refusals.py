"""Issue #22: a command refused in a directory (it is locked, or holds another run's state) changes
nothing there, and every failure a user can cause ends in one line naming the file or key, without
a traceback (HYDRA_FULL_ERROR=1 shows one). Each case runs the real entry point in a subprocess."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from domino.core.locking import LOCK_NAME, output_lock

from .conftest import FIXTURES, ROOT, SMALL_TRAIN

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DOMINO_PROGRESS": "0"}
ENV.pop("HYDRA_FULL_ERROR", None)
SYNTH = ["engine.batch_size=4", "sampling.max_new_tokens=6", "progress=false", "n=4", "curation.judge.mode=logprob",
         "curation.responses.generation.sampling.max_new_tokens=6", "curation.code_checks.enabled=false"]
SFT = ["backbone=tiny", "sft.val_size=0", "sft.batch_size=4", "sft.max_len=96", "lora.r=2", "lora.alpha=4",
       "trainer.max_steps=2", "checkpoint_every_n_steps=1", "export=last", "trainer.enable_model_summary=false",
       "trainer.enable_progress_bar=false"]
EVAL = ["backbone=tiny", "n_samples=1", "k=[1]", "sampling.max_new_tokens=4", "engine.batch_size=4"]


def run(script: str, *overrides: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def snapshot(d: Path) -> dict[str, str]:
    """Every file under `d` (the lock file aside: its holder line is cleared on release) -> sha256."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def refused(proc: subprocess.CompletedProcess, *must: str) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    for m in must:
        assert m in last, last
    return last


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("refusals") / "train"
    ok = run("train.py", *SMALL_TRAIN, "checkpoint_every_n_steps=1", f"hydra.run.dir={d}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (d / ".hydra" / "config.yaml").exists() and (d / "train.log").exists()
    return d


@pytest.mark.slow
def test_train_refusals_leave_the_run_untouched(train_run):
    before = snapshot(train_run)
    last = train_run / "checkpoints" / "last.ckpt"
    other_refs = run("train.py", *SMALL_TRAIN, "domain.n_references=6", "trainer.max_steps=4", f"ckpt_path={last}",
                     f"hydra.run.dir={train_run}")
    refused(other_refs, str(last), "reference set")
    done = run("train.py", *SMALL_TRAIN, f"ckpt_path={last}", f"hydra.run.dir={train_run}")  # max_steps=2 reached
    refused(done, "nothing is left to train", "trainer.max_steps=2")
    with output_lock(train_run, "test"):  # another live writer
        locked = run("train.py", *SMALL_TRAIN, "trainer.max_steps=4", f"ckpt_path={last}", f"hydra.run.dir={train_run}")
    refused(locked, "is in use by pid")
    assert snapshot(train_run) == before


@pytest.mark.slow
def test_synthesize_and_curate_refusals_leave_the_run_untouched(train_run, tmp_path):
    out = tmp_path / "synth"
    ckpt = train_run / "domain_prompt.safetensors"
    ok = run("synthesize.py", *SYNTH, f"ckpt={ckpt}", f"output_dir={out}", "curate=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = snapshot(out)
    refused(run("synthesize.py", *SYNTH, f"ckpt={ckpt}", f"output_dir={out}", "sampling.temperature=0.5"),
            "different configuration", "sampling")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"x{i}", "text": f"Write a function number {i} that adds two "
                                         "integers and returns their sum."}) + "\n" for i in range(3)))
    refused(run("synthesize.py", "stage=curate", f"samples={other}", f"output_dir={out}", "backbone=tiny",
                "curation.judge.mode=logprob"), "holds the curation of samples", str(other))
    assert snapshot(out) == before


@pytest.mark.slow
def test_finetune_resume_on_another_sft_file_is_refused(tmp_path):
    out = tmp_path / "ft"
    data = FIXTURES / "sft_small.jsonl"
    ok = run("finetune.py", *SFT, f"data={data}", f"hydra.run.dir={out}", "trainer.max_steps=1")
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = snapshot(out)
    other = tmp_path / "other_sft.jsonl"
    recs = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
    other.write_text("".join(json.dumps(r) + "\n" for r in recs[::-1]))
    last = refused(run("finetune.py", *SFT, f"data={other}", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}",
                       f"hydra.run.dir={out}"), "was trained on SFT data sha256", str(other))
    assert last.count("sha256") == 1 and " is " in last  # both digests named
    assert snapshot(out) == before


@pytest.mark.slow
def test_evaluate_into_a_directory_of_another_benchmark_is_refused(tmp_path):
    out = tmp_path / "ev"
    ok = run("evaluate.py", *EVAL, "benchmark=humaneval", "benchmark.limit=2", f"hydra.run.dir={out}")
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = snapshot(out)
    refused(run("evaluate.py", *EVAL, "benchmark=mbpp", f"benchmark.path={FIXTURES / 'bench_mbpp.jsonl'}",
                f"hydra.run.dir={out}"), "holds the evaluation of benchmark humaneval")
    with output_lock(out, "test"):
        refused(run("evaluate.py", *EVAL, "benchmark=humaneval", "benchmark.limit=2", f"hydra.run.dir={out}"),
                "is in use by pid")
    assert snapshot(out) == before
    # the same benchmark with more tasks extends the run
    more = run("evaluate.py", *EVAL, "benchmark=humaneval", "benchmark.limit=3", f"hydra.run.dir={out}")
    assert more.returncode == 0, more.stderr[-3000:]


@pytest.mark.slow
def test_a_failure_is_one_line_in_stderr_and_in_the_stage_log(tmp_path):
    bad = tmp_path / "refs.jsonl"
    bad.write_text('{"text": "def f(): pass"}\n{"text": "x" \n')
    out = tmp_path / "run"
    proc = run("train.py", *SMALL_TRAIN, "domain=jsonl", f"domain.path={bad}", f"hydra.run.dir={out}")
    line = refused(proc, f"{bad}:2", "malformed JSON")
    assert proc.stderr.count(line) == 1
    # the domain is read before the run owns its directory: a refused input writes no record there
    assert not (out / ".hydra").exists() and not (out / "train.log").exists()
    full = run("train.py", *SMALL_TRAIN, "domain=jsonl", f"domain.path={bad}", f"hydra.run.dir={out}",
               env={**ENV, "HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 1 and "Traceback" in full.stderr
    # after the run is accepted, the failure line is in the stage log too
    ev = tmp_path / "ev"
    comp = tmp_path / "completions.jsonl"
    comp.write_text(json.dumps({"solution": "def f(): pass"}) + "\n")
    proc = run("evaluate.py", *EVAL, "benchmark=humaneval", "benchmark.limit=1", f"samples={comp}",
               f"hydra.run.dir={ev}")
    line = refused(proc, f"{comp}:1", "task_id")
    assert line in (ev / "evaluate.log").read_text()


@pytest.mark.slow
def test_an_unwritable_output_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    refused(run("evaluate.py", *EVAL, f"hydra.run.dir={blocker / 'sub'}"), str(blocker / "sub"),
            "choose another output directory")
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory; the mount case needs a read-only filesystem")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    refused(run("evaluate.py", *EVAL, f"hydra.run.dir={ro / 'sub'}"), "choose another output directory")


def test_os_errors_name_their_place_and_the_remedy_even_when_chained():
    import errno

    from domino.core.attempt import one_line
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise OSError("write failed") from inner
    except OSError as e:
        line = one_line(e, "/data/run")
    assert line.startswith("No space left on device: /data/run; free space there and rerun the same command")
    ro = one_line(PermissionError(errno.EROFS, "Read-only file system", "/mnt/ro/run"))
    assert "/mnt/ro/run" in ro and "read-only" in ro and "another output directory" in ro
    assert one_line(ValueError("a\n  b")) == "a b"
