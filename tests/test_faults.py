"""Fault injection on the tiny backbone (issue #14): two writers on one directory, torn last lines,
runs stopped or killed and resumed (compared with an uninterrupted run where the stage is
deterministic), damaged or mismatched files, and bad config values. The sandbox's faults are in
core/test_sandbox_faults.py."""
from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from domino.core.locking import LOCK_NAME, OutputLocked, output_lock
from domino.core.records import JsonlStore, RecordError, read_jsonl
from domino.core.trainer import DIGEST_KEY, CheckpointError, state_dict_digest
from domino.core.validate import ConfigError
from domino.curation.run import run_curation

from .conftest import CONF, FIXTURES, ROOT, SMALL_TRAIN, StopAt, compose_config
from .curation.test_curation_pipeline import HELDOUT, FakeModel

SYNTH = ["engine.batch_size=2", "sampling.max_new_tokens=8", "progress=false", "engine.num_threads=1"]
# 8 references in batches of 4: two batches an epoch, so steps 1, 3, 5 end mid-epoch
RESUME = SMALL_TRAIN + ["trainer.max_steps=6", "checkpoint_every_n_steps=1"]
SFT = ["backbone=tiny", f"data={FIXTURES / 'sft_small.jsonl'}", "sft.val_size=2", "sft.batch_size=4",
       "sft.max_len=96", "lora.r=4", "lora.alpha=8", "lora.dropout=0.3", "optim.lr=0.02", "optim.warmup_steps=0",
       "trainer.max_steps=7", "checkpoint_every_n_steps=1", "export=last", "trainer.enable_model_summary=false",
       "trainer.enable_progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def train(overrides, out, callbacks=()):
    import domino.training.run as tr
    build = tr.build_trainer
    tr.build_trainer = lambda cfg, cbs: build(cfg, list(cbs) + list(callbacks))
    try:
        return tr.train(compose_config("train", overrides, out))
    finally:
        tr.build_trainer = build


def synthesize(out, *overrides):
    from domino.stages import synthesize as run
    n = torch.get_num_threads()
    try:
        return run(compose_config("synthesize", SYNTH + list(overrides), out))
    finally:
        torch.set_num_threads(n)


def metric(out, name):
    """(step, value) of every row of <out>/csv/metrics.csv that has `name`."""
    with open(Path(out) / "csv" / "metrics.csv") as fh:
        return [(int(r["step"]), float(r[name])) for r in csv.DictReader(fh) if r.get(name)]


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    """A 2-step training run: its domain prompt is what the synthesis tests sample from."""
    out = tmp_path_factory.mktemp("train")
    train(SMALL_TRAIN, out)
    return out


@pytest.fixture()
def holder(tmp_path):
    """Another live process holding a directory's lock: yields (dir, process)."""
    d = tmp_path / "held"
    code = ("import sys, time\nfrom domino.core.locking import output_lock\n"
            "with output_lock(sys.argv[1], 'holder-stage'):\n    print('ready', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, env=ENV)
    assert proc.stdout.readline().strip() == b"ready"
    yield d, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


# ------------------------------------------------------------------------------ 1. two writers
def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(holder, prompt_run):
    d, proc = holder
    with pytest.raises(OutputLocked, match=rf"in use by pid {proc.pid} .*holder-stage"):
        synthesize(d, f"ckpt={prompt_run / 'domain_prompt.safetensors'}", "n=2", f"output_dir={d}")
    with pytest.raises(OutputLocked, match="in use"):
        train(SMALL_TRAIN, d)
    samples = d / "samples.jsonl"
    assert not samples.exists()
    proc.send_signal(signal.SIGKILL)  # the holder dies without releasing anything
    proc.wait()
    assert (d / LOCK_NAME).exists()  # the stale file is there, its flock is gone with the process
    synthesize(d, f"ckpt={prompt_run / 'domain_prompt.safetensors'}", "n=2", f"output_dir={d}")
    assert [r["id"] for r in read_jsonl(samples)] == ["domino-0000000", "domino-0000001"]


def test_curation_takes_the_lock_and_the_lock_is_reentrant(holder, tmp_path):
    d, _ = holder
    shutil.copy(FIXTURES / "curation_samples.jsonl", d / "samples.jsonl")
    with pytest.raises(OutputLocked, match="curate: output directory"):
        run_curation({}, d / "samples.jsonl", d, generators=FakeModel(), progress=False)
    assert not (d / "curation").exists()
    # one process may nest (synthesize.py curate=true samples, then curates, into one directory)
    free = tmp_path / "free"
    with output_lock(free, "outer"), output_lock(free, "inner"):
        pass
    with output_lock(free, "again"):
        pass


@pytest.mark.slow
def test_two_concurrent_synthesize_runs_never_duplicate_a_sample(prompt_run, tmp_path):
    """A second synthesize.py into a directory another one is writing is refused while the first
    is mid-run (the overlap is checked, not assumed); the first finishes with every sample once."""
    out = tmp_path / "shared"
    cmd = [sys.executable, str(ROOT / "synthesize.py"), f"ckpt={prompt_run / 'domain_prompt.safetensors'}", "n=160",
           "engine.batch_size=2", "sampling.max_new_tokens=48", "sampling.min_new_tokens=48", "progress=false",
           f"output_dir={out}", f"paths.log_dir={tmp_path / 'logs'}"]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples, deadline = out / "samples.jsonl", time.time() + 240
    while time.time() < deadline and first.poll() is None and not (samples.exists() and samples.read_text()):
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before a second could start: " + first.stderr.read().decode()
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the runs did not overlap: make the first one longer"
    assert second.returncode != 0 and f"in use by pid {first.pid}" in second.stderr, second.stderr[-3000:]
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()[-3000:]
    ids = [r["id"] for r in read_jsonl(samples)]
    assert ids == [f"domino-{i:07d}" for i in range(160)]


# ------------------------------------------------------------------------------ 3. torn last lines
def test_store_drops_a_torn_tail_says_so_and_never_duplicates(tmp_path, caplog):
    f = tmp_path / "c.jsonl"
    key = lambda r: (r["task_id"], r["sample_idx"])  # noqa: E731 - the evaluation stage's key
    with JsonlStore(f, key=key) as s:
        assert s.add({"task_id": "a", "sample_idx": 0}) and s.add({"task_id": "a", "sample_idx": 1})
    with open(f, "a") as fh:
        fh.write('{"task_id": "a", "sample_idx": 2, "out')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="domino.core.records"):
        s = JsonlStore(f, key=key, keep_records=True)
    assert f"{f}:3: dropped a torn last line" in caplog.text
    assert len(s) == 2 and ("a", 1) in s and s.records[("a", 0)] == {"task_id": "a", "sample_idx": 0}
    assert not s.add({"task_id": "a", "sample_idx": 1})  # reused from a resumed run: not written twice
    assert s.add({"task_id": "a", "sample_idx": 2})
    s.close()
    assert [key(r) for r in read_jsonl(f)] == [("a", 0), ("a", 1), ("a", 2)]
    f.write_text(f.read_text() + f.read_text().splitlines()[0] + "\n")
    with pytest.raises(RecordError, match=r"c.jsonl:4: duplicate record \('a', 0\)"):
        JsonlStore(f, key=key)


def test_evaluate_resumes_into_its_own_directory_past_a_torn_line_without_duplicates(tmp_path, caplog):
    """The crashed run's completions.jsonl (a torn last line) resumed in place, also with resume=
    naming that same file: every (task, sample) exactly once, equal to an uninterrupted run."""
    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.params import SamplingParams
    from domino.evaluation.generation import generate_completions

    from .conftest import TINY
    problems = load_benchmark("humaneval", limit=2)
    params = SamplingParams(temperature=0.8, top_k=50, max_new_tokens=6)

    def run(out, resume=None):
        recs, _ = generate_completions(problems, TINY, params, 2, 0, out / "completions.jsonl",
                                       engine={"name": "hf", "batch_size": 1}, resume=resume)
        return recs

    whole = run(tmp_path / "whole")
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    lines = (tmp_path / "whole" / "completions.jsonl").read_text().splitlines()
    (crashed / "completions.jsonl").write_text(lines[0] + "\n" + lines[1][:25])  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="domino.core.records"):
        got = run(crashed, resume=str(crashed))
    assert "dropped a torn last line" in caplog.text
    assert got == whole
    on_disk = read_jsonl(crashed / "completions.jsonl")
    assert sorted((r["task_id"], r["sample_idx"]) for r in on_disk) == sorted(
        (r["task_id"], r["sample_idx"]) for r in whole)
    assert run(crashed, resume=str(crashed / "completions.jsonl")) == whole  # rerun: nothing appended
    assert len(read_jsonl(crashed / "completions.jsonl")) == len(whole)


def test_evaluate_takes_the_output_lock_and_checks_values_first(holder, tmp_path):
    from omegaconf import OmegaConf

    from domino.evaluation.run import run_passk
    d, proc = holder
    cfg = OmegaConf.create({"paths": {"output_dir": str(d)}, "seed": 0, "n_samples": 1, "k": [1],
                            "sampling": {"temperature": 0.0}})
    with pytest.raises(OutputLocked, match=rf"in use by pid {proc.pid}"):
        run_passk(cfg)
    cfg.n_samples = "abc"
    with pytest.raises(ConfigError, match="n_samples='abc'"):
        run_passk(cfg)


def test_shared_execution_cache_never_glues_a_record_to_a_torn_line(tmp_path):
    from domino.core.sandbox import ExecResult, ExecutionCache
    f = tmp_path / "exec_cache.jsonl"
    c = ExecutionCache(f)
    r = ExecResult(status="passed", passed_tests=1, total_tests=1, seconds=0.1)
    c.put("k1", r)
    c.close()
    with open(f, "a") as fh:
        fh.write('{"key": "k2", "res')  # a crashed writer
    c = ExecutionCache(f)
    assert c.get("k1") is not None and c.get("k2") is None
    c.put("k3", r)
    c.close()
    c = ExecutionCache(f)
    assert c.get("k1") is not None and c.get("k3") is not None
    assert len(f.read_text().splitlines()) == 3  # k1, the fragment on its own line, k3


def test_curation_resumes_past_a_torn_model_stage_line(tmp_path, caplog):
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(CONF / "curation" / "default.yaml")
    cfg.judge.generation.batch_size = cfg.responses.generation.batch_size = 2
    kw = {"references": FIXTURES / "curation_references.jsonl", "eval_sets": [HELDOUT], "progress": False}
    run, clean = tmp_path / "run", tmp_path / "clean"
    for d in (run, clean):
        d.mkdir()
        shutil.copy(FIXTURES / "curation_samples.jsonl", d / "samples.jsonl")
    with pytest.raises(KeyboardInterrupt):
        run_curation(cfg, run / "samples.jsonl", run, generators=FakeModel(crash_after=5), **kw)
    stage = run / "curation" / "07_responses.jsonl"
    with open(stage, "a") as fh:
        fh.write('{"id": "s-3", "text": "half a rec')  # the crash hit mid-write
    with caplog.at_level(logging.WARNING, logger="domino.core.records"):
        run_curation(cfg, run / "samples.jsonl", run, generators=FakeModel(), **kw)
    assert "07_responses.jsonl:3: dropped a torn last line" in caplog.text
    run_curation(cfg, clean / "samples.jsonl", clean, generators=FakeModel(), **kw)
    for name in ("curation/07_responses.jsonl", "curation/07_responses.dropped.jsonl", "curated.jsonl", "sft.jsonl"):
        assert read_jsonl(run / name) == read_jsonl(clean / name), name


def test_synthesis_resumes_past_a_torn_sample_line(prompt_run, tmp_path):
    ckpt = f"ckpt={prompt_run / 'domain_prompt.safetensors'}"
    synthesize(tmp_path / "ref", ckpt, "n=6")
    out = tmp_path / "torn"
    synthesize(out, ckpt, "n=6", f"output_dir={out}")
    lines = (out / "samples.jsonl").read_text().splitlines(keepends=True)
    (out / "samples.jsonl").write_text("".join(lines[:3]) + lines[3][:25])  # 3 whole + a torn 4th
    assert synthesize(out, ckpt, "n=6", f"output_dir={out}")["n_new"] == 3
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(tmp_path / "ref" / "samples.jsonl")


# ------------------------------------------------------------------------------ 4. exact resume
@pytest.mark.parametrize("stop", [3, 4])  # mid-epoch, end of an epoch
def test_train_resume_reproduces_the_uninterrupted_losses_and_keeps_the_log(tmp_path, stop):
    train(RESUME, tmp_path / "full")
    run = tmp_path / "run"
    train(RESUME, run, [StopAt(stop)])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == stop
    train(RESUME + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], run)  # into the crashed run's own dir
    want, got = metric(tmp_path / "full", "train/loss"), metric(run, "train/loss")
    assert [s for s, _ in got] == list(range(6))  # history kept, no step twice
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-6)
    assert json.loads((run / "domain_prompt.json").read_text())["steps"] == 6
    # the interrupted epoch's means are over all its steps, not only those after the resume
    for key in ("train/loss_epoch", "train/loss_con_epoch", "train/contrast_gap_epoch"):
        want_e, got_e = metric(tmp_path / "full", key), metric(run, key)
        assert got_e and [s for s, _ in got_e] == [s for s, _ in want_e], key
        assert [v for _, v in got_e] == pytest.approx([v for _, v in want_e], rel=1e-6, abs=1e-6), key
    final = json.loads((run / "domain_prompt.json").read_text())["metrics"]
    assert final["train/loss_epoch"] == pytest.approx(
        json.loads((tmp_path / "full" / "domain_prompt.json").read_text())["metrics"]["train/loss_epoch"], rel=1e-6)


def test_train_resume_on_another_reference_set_is_refused(tmp_path):
    train(SMALL_TRAIN, tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=re.escape(f"{last}: checkpoint was trained on reference set ")
                       + r"\w+, this run's references are \w+"):
        train(SMALL_TRAIN + ["domain.split_seed=1", "trainer.max_steps=4", f"ckpt_path={last}"], tmp_path / "b")


@pytest.mark.slow
def test_train_killed_at_a_random_point_resumes_exactly(tmp_path):
    """SIGKILL train.py once a random checkpoint exists, rerun it into its own directory."""
    steps = ["trainer.max_steps=12", "checkpoint_every_n_steps=1"]
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL_TRAIN, *steps, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, at = run / "checkpoints" / "last.ckpt", random.Random(os.getpid()).randint(1, 8)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if torch.load(last, map_location="cpu", weights_only=False)["global_step"] >= at:
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    at = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    done = subprocess.run(cmd + [f"ckpt_path={last}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(SMALL_TRAIN + steps, tmp_path / "full")
    finally:
        torch.set_num_threads(n)
    want, got = dict(metric(tmp_path / "full", "train/loss")), metric(run, "train/loss")
    steps = [s for s, _ in got]
    assert steps == sorted(set(steps)) and set(range(at, 12)) <= set(steps)  # no step twice, all resumed ones
    # the killed run's rows are kept; only the row of the checkpoint's own step can be missing (Lightning
    # logs it just after writing the checkpoint: a kill in that moment loses it)
    assert set(range(at - 1)) <= set(steps), (at, steps)
    assert [v for _, v in got] == pytest.approx([want[s] for s in steps], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_finetune_resume_with_dropout_reproduces_the_losses(tmp_path):
    import domino.finetune.run as ft
    ft.finetune(compose_config("finetune", SFT, tmp_path / "full"))
    run = tmp_path / "run"
    callbacks_for = ft.callbacks_for
    ft.callbacks_for = lambda *a: (lambda cb, best: (cb + [StopAt(4)], best))(*callbacks_for(*a))
    try:
        ft.finetune(compose_config("finetune", SFT, run))
    finally:
        ft.callbacks_for = callbacks_for
    ft.finetune(compose_config("finetune", SFT + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], run))
    want, got = metric(tmp_path / "full", "train/loss"), metric(run, "train/loss")
    assert [s for s, _ in got] == list(range(7))
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-6)
    want_e, got_e = metric(tmp_path / "full", "train/loss_epoch"), metric(run, "train/loss_epoch")
    assert got_e and [v for _, v in got_e] == pytest.approx([v for _, v in want_e], rel=1e-6, abs=1e-6)


def test_finetune_default_run_writes_intermediate_checkpoints():
    cfg = compose_config("finetune", ["data=x.jsonl"], "/tmp/x")
    assert 0 < cfg.checkpoint_every_n_steps < cfg.trainer.max_steps


# ------------------------------------------------------------------------------ 5. damaged state
def test_damaged_checkpoints_are_named(tmp_path):
    train(SMALL_TRAIN, tmp_path / "a")
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=re.escape(f"{truncated}: cannot read this checkpoint")):
        train(SMALL_TRAIN + ["trainer.max_steps=4", f"ckpt_path={truncated}"], tmp_path / "b")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["state_dict"]["prompts.domain"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")  # tensors changed after the digest was taken
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nan.ckpt'}: its tensors do not match")):
        train(SMALL_TRAIN + ["trainer.max_steps=4", f"ckpt_path={tmp_path / 'nan.ckpt'}"], tmp_path / "c")
    ckpt[DIGEST_KEY] = state_dict_digest(ckpt["state_dict"])  # a digest that agrees: the NaN itself is refused
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'nan.ckpt'}: non-finite values (NaN/inf) in "
                                                        "['prompts.domain']")):
        train(SMALL_TRAIN + ["trainer.max_steps=4", f"ckpt_path={tmp_path / 'nan.ckpt'}"], tmp_path / "d")


def test_a_checkpoint_that_cannot_be_written_stops_training(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    if os.geteuid() != 0:
        (out / "checkpoints").mkdir(parents=True)
        os.chmod(out / "checkpoints", 0o555)
    else:  # root ignores permission bits: fail the write the way a read-only directory would
        replace = os.replace

        def refuse(src, dst, *a, **kw):
            if str(dst).endswith(".ckpt"):
                raise PermissionError(13, "Permission denied", str(dst))
            return replace(src, dst, *a, **kw)
        monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*last.ckpt .*Permission denied.*training "
                                              "stops"):
        train(SMALL_TRAIN + ["trainer.max_steps=4", "checkpoint_every_n_steps=2"], out)
    assert not (out / "domain_prompt.safetensors").exists()  # no export from a run that could not checkpoint


# ------------------------------------------------------------------------------ 6. bad values
def test_non_utf8_bytes_are_named_with_file_line_and_offset(tmp_path):
    from domino.core.domains import load_records
    refs = tmp_path / "refs.jsonl"
    refs.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff byte"}\n')
    with pytest.raises(RecordError, match=r"refs.jsonl:2: not valid UTF-8: byte b'\\xff' at column 15 "
                                          r"\(byte offset 31 in the file\)"):
        load_records("jsonl", str(refs))
    as_json = tmp_path / "refs.json"
    as_json.write_bytes(b'[{"text": "fine"},\n {"text": "\xfe"}]')
    with pytest.raises(RecordError, match=r"refs.json:2: not valid UTF-8"):
        load_records("jsonl", str(as_json))
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b'{"id": "a", "text": "\xc3("}\n')
    with pytest.raises(RecordError, match=r"samples.jsonl:1: not valid UTF-8"):
        run_curation({}, samples, tmp_path, generators=FakeModel(), progress=False)


@pytest.mark.parametrize("stage,override,match", [
    ("train", "data.batch_size=abc", r"data.batch_size='abc': expected an integer, got str"),
    ("train", "optim.lr_domain=-0.1", r"optim.lr_domain=-0.1: must be >= 0 \(a learning rate"),
    ("train", "prompt.l=-1", r"prompt.l=-1: must be >= 0 \(sample tokens; 0 = none\)"),
    ("train", "trainer.max_steps=1.5", r"trainer.max_steps=1.5: expected an integer"),
    ("synthesize", "n=abc", r"n='abc': expected an integer"),
    ("synthesize", "sampling.top_p=0", r"sampling.top_p=0: must be > 0"),
    ("finetune", "optim.lr=-1", r"optim.lr=-1: must be >= 0"),
    ("finetune", "lora.dropout=2", r"lora.dropout=2: must be <= 1"),
])
def test_bad_values_are_refused_up_front_naming_the_key(tmp_path, stage, override, match):
    from domino.stages import STAGES
    run = STAGES[stage].run
    base = {"train": SMALL_TRAIN, "synthesize": SYNTH + ["method=zero_shot", "backbone=tiny"],
            "finetune": ["backbone=tiny", "data=nowhere.jsonl"]}[stage]
    with pytest.raises(ConfigError, match=match):
        run(compose_config(stage, base + [override], tmp_path))
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_curating_a_run_without_a_heldout_split_skips_it_with_a_note(tmp_path, caplog):
    (tmp_path / "heldout.jsonl").write_text("")  # what train.py writes for domain=jsonl, all references
    shutil.copy(FIXTURES / "curation_samples.jsonl", tmp_path / "samples.jsonl")
    (tmp_path / "lineage.json").write_text(json.dumps({
        "references": str(FIXTURES / "curation_references.jsonl"), "heldout": str(tmp_path / "heldout.jsonl")}))
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(CONF / "curation" / "default.yaml")
    with caplog.at_level(logging.WARNING):
        result = run_curation(cfg, tmp_path / "samples.jsonl", tmp_path, generators=FakeModel(), progress=False)
    assert "empty held-out split" in caplog.text and "decontamination skips it" in caplog.text
    meta = json.loads((tmp_path / "curation" / "05_decontaminate.meta.json").read_text())
    assert list(meta["eval_sets"]) == ["humaneval"] and result["n_sft"] > 0
