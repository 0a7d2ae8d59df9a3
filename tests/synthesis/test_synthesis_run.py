"""synthesize.py end to end on the tiny backbone: both checkpoint kinds, provenance, backbone and
method checks, baselines, resume (also after SIGKILL), overwrite refusal, stage dispatch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from domino.stages import synthesize as run

from ..conftest import ROOT, SMALL_TRAIN, compose_config

FAST = ["n=4", "engine.batch_size=2", "sampling.max_new_tokens=8", "progress=false", "engine.num_threads=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (2-step) training run on the tiny backbone."""
    from domino.training.run import train
    out = tmp_path_factory.mktemp("train")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(compose_config("train", SMALL_TRAIN, out))
    finally:
        torch.set_num_threads(n)
    assert (out / "domain_prompt.safetensors").exists() and (out / "checkpoints" / "last.ckpt").exists()
    return out


def synth(out, *overrides):
    n = torch.get_num_threads()
    try:
        return run(compose_config("synthesize", FAST + list(overrides), out))
    finally:
        torch.set_num_threads(n)


def records(out):
    return [json.loads(x) for x in (Path(out) / "samples.jsonl").read_text().splitlines()]


def test_every_method_and_engine_composes(tmp_path):
    for method in ("domain_prompt", "few_shot", "zero_shot", "magpie"):
        for engine in ("hf", "vllm"):
            cfg = compose_config("synthesize", [f"method={method}", f"engine={engine}"], tmp_path)
            c = OmegaConf.to_container(cfg, resolve=True)
            assert c["method"]["name"] == method and c["engine"]["name"] == engine
            assert c["stage"] == "sample" and c["curate"] is False and c["sampling"]["temperature"] == 1.0


def test_both_checkpoint_kinds_give_the_same_samples_with_provenance(run_dir, tmp_path):
    a = synth(tmp_path / "a", f"ckpt={run_dir / 'domain_prompt.safetensors'}")
    b = synth(tmp_path / "b", f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}")
    c = synth(tmp_path / "c", f"ckpt={run_dir}")  # a run dir: its export
    assert c["n_present"] == 4
    ra, rb, rc = records(tmp_path / "a"), records(tmp_path / "b"), records(tmp_path / "c")
    assert a["n_present"] == b["n_present"] == 4
    assert [r["text"] for r in ra] == [r["text"] for r in rb] == [r["text"] for r in rc]
    assert [r["id"] for r in ra] == [f"domino-{i:07d}" for i in range(4)]
    meta = json.loads((run_dir / "domain_prompt.json").read_text())
    for i, r in enumerate(ra):
        assert r["method"] == "domino" and r["finish_reason"] in ("stop", "length")
        s = r["source"]
        assert s["ckpt"].endswith("domain_prompt.safetensors") and s["backbone_hash"] == meta["backbone_hash"]
        assert s["index"] == i and s["run_seed"] == 0 and s["temperature"] == 1.0 and s["max_new_tokens"] == 8
        assert s["truncated"] == (r["finish_reason"] == "length") and isinstance(s["seed"], int)
    assert rb[0]["source"]["ckpt"].endswith("last.ckpt")
    saved = json.loads((tmp_path / "a" / "samples.meta.json").read_text())
    assert saved["fingerprint"] == ra[0]["source"]["fingerprint"] and saved["last_run"]["n_present"] == 4


def test_same_seed_same_samples_other_seed_others(run_dir, tmp_path):
    ck = f"ckpt={run_dir / 'domain_prompt.safetensors'}"
    synth(tmp_path / "a", ck, "seed=7")
    synth(tmp_path / "b", ck, "seed=7")
    synth(tmp_path / "c", ck, "seed=8")
    ta, tb, tc = ([r["text"] for r in records(tmp_path / x)] for x in "abc")
    assert ta == tb and ta != tc and len(set(ta)) == 4


def test_backbone_mismatch_is_refused(run_dir, tmp_path):
    ck = f"ckpt={run_dir / 'domain_prompt.safetensors'}"
    with pytest.raises(ValueError, match="hidden size"):
        synth(tmp_path / "a", ck, "backbone=tiny", "backbone.tiny.hidden_size=32")
    with pytest.raises(ValueError, match="config hash"):
        synth(tmp_path / "b", ck, "backbone=tiny", "backbone.tiny.num_layers=3")
    # the matching backbone, given explicitly, is accepted
    assert synth(tmp_path / "c", ck, "backbone=tiny", "n=1")["n_present"] == 1


def test_metadata_that_does_not_match_its_tensor_is_refused(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    d = tmp_path / "bad"
    d.mkdir()
    D = load_file(run_dir / "domain_prompt.safetensors")["domain_tokens"]
    save_file({"domain_tokens": D[:, :32].contiguous()}, str(d / "domain_prompt.safetensors"))
    meta = json.loads((run_dir / "domain_prompt.json").read_text())
    (d / "domain_prompt.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="digest .* is not the .* recorded in domain_prompt.json"):
        synth(tmp_path / "o", f"ckpt={d / 'domain_prompt.safetensors'}")
    del meta["digest"]  # an export without a digest: the shapes still have to agree
    (d / "domain_prompt.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="do not belong together"):
        synth(tmp_path / "o", f"ckpt={d / 'domain_prompt.safetensors'}")


def test_non_finite_or_truncated_domain_prompt_is_refused_naming_the_file(run_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from domino.core.domain_prompt import tensor_digest
    d = tmp_path / "nan"
    d.mkdir()
    D = load_file(run_dir / "domain_prompt.safetensors")["domain_tokens"].clone()
    D[0, 0] = float("nan")
    save_file({"domain_tokens": D}, str(d / "domain_prompt.safetensors"))
    meta = json.loads((run_dir / "domain_prompt.json").read_text())
    (d / "domain_prompt.json").write_text(json.dumps({**meta, "digest": tensor_digest(D)}))
    with pytest.raises(ValueError, match=r"nan/domain_prompt.safetensors: 1 of 256 .*NaN or infinite"):
        synth(tmp_path / "o", f"ckpt={d}")
    t = tmp_path / "torn"
    t.mkdir()
    raw = (run_dir / "domain_prompt.safetensors").read_bytes()
    (t / "domain_prompt.safetensors").write_bytes(raw[: len(raw) // 2])
    (t / "domain_prompt.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"torn/domain_prompt.safetensors: cannot read .*damaged or truncated"):
        synth(tmp_path / "o", f"ckpt={t}")
    (t / "domain_prompt.safetensors").write_bytes(raw)
    (t / "domain_prompt.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(ValueError, match=r"torn/domain_prompt.json: not valid JSON"):
        synth(tmp_path / "o", f"ckpt={t}")
    c = tmp_path / "ckpt"
    c.mkdir()
    raw = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    (c / "last.ckpt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"ckpt/last.ckpt: cannot read the checkpoint"):
        synth(tmp_path / "o", f"ckpt={c / 'last.ckpt'}")
    ck = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ck["state_dict"]["prompts.domain"][0, 0] += 1.0  # changed after it was written
    torch.save(ck, c / "tampered.ckpt")
    with pytest.raises(RuntimeError, match=r"tampered.ckpt: its tensors do not match the digest"):
        synth(tmp_path / "o", f"ckpt={c / 'tampered.ckpt'}")


def test_domain_prompt_samples_are_named_after_the_objective(run_dir, tmp_path):
    with pytest.raises(ValueError, match="needs ckpt"):
        synth(tmp_path / "b")  # method=domain_prompt (the default) without a checkpoint
    synth(tmp_path / "a", f"ckpt={run_dir}", "n=2")
    assert [r["id"] for r in records(tmp_path / "a")] == ["domino-0000000", "domino-0000001"]


@pytest.mark.parametrize("method", ["few_shot", "zero_shot", "magpie"])
def test_baselines_write_records_of_their_method(run_dir, tmp_path, method):
    # the checkpoint only lends its backbone (tiny) to the baseline
    res = synth(tmp_path, f"method={method}", f"ckpt={run_dir}", "domain.n_references=8", "method.k=2"
                if method == "few_shot" else "n=4")
    recs = records(tmp_path)
    assert res["n_present"] == 4 and [r["method"] for r in recs] == [method] * 4
    assert all(r["id"].startswith(method + "-") for r in recs)
    meta = json.loads((tmp_path / "samples.meta.json").read_text())
    # the lineage names the domain (its split is rebuilt from it) and the backbone: curation's inputs
    from domino.core import lineage
    from domino.curation.sources import run_sources
    lin = lineage.read(tmp_path / "samples.jsonl")
    assert lin["domain"]["n_references"] == 8 and lin["backbone"]["path"] == "tiny"
    found = run_sources(tmp_path / "samples.jsonl")  # the checkpoint lending the backbone names its references
    assert found["references"] == lin["references"] == str((run_dir / "references.jsonl").resolve())
    del lin["references"], lin["heldout"]  # a baseline without a checkpoint: the split comes from its domain
    (tmp_path / "lineage.json").write_text(json.dumps(lin))
    found = run_sources(tmp_path / "samples.jsonl")
    assert len(found["references"]) == 8 and len(found["heldout"]) == 164 - 8 and found["backbone"] == lin["backbone"]
    if method == "few_shot":
        refs = [r["source"]["references"] for r in recs]
        assert all(len(x) == 2 for x in refs) and len({tuple(x) for x in refs}) > 1
        assert all(x.startswith("HumanEval/") for r in refs for x in r)
    if method == "zero_shot":
        assert "Python programming problems" in meta["inputs"]["plan"]["prompt"]
    if method == "magpie":
        assert meta["inputs"]["plan"]["pre_query"].endswith("<|im_start|>user\n")


def test_rerun_continues_extends_and_refuses_other_configs(run_dir, tmp_path):
    ck = f"ckpt={run_dir / 'domain_prompt.safetensors'}"
    synth(tmp_path / "full", ck, "n=6")
    first = synth(tmp_path / "o", ck, "n=3")
    again = synth(tmp_path / "o", ck, "n=3")
    assert first["n_new"] == 3 and again["n_new"] == 0 and len(records(tmp_path / "o")) == 3
    more = synth(tmp_path / "o", ck, "n=6")
    assert more["n_new"] == 3
    assert records(tmp_path / "o") == records(tmp_path / "full")
    with pytest.raises(FileExistsError, match="temperature"):
        synth(tmp_path / "o", ck, "n=6", "sampling.temperature=0.5")
    res = synth(tmp_path / "o", ck, "n=2", "sampling.temperature=0.5", "overwrite=true")
    assert res["n_new"] == 2 and len(records(tmp_path / "o")) == 2


@pytest.mark.parametrize("method", ["domain_prompt", "few_shot"])
def test_refill_writes_samples_as_they_finish_and_ends_in_index_order(run_dir, tmp_path, monkeypatch, method):
    """engine.refill=true (continuous batching, the default) writes each sample as it finishes; the
    finished file is in index order, holds the samples fixed batches give (this fp32 tiny model's
    rounding does not move a draw at T=1), and a refill run continues a fixed-batch one (refill is
    not part of the fingerprint)."""
    from domino.synthesis.output import SampleStore
    ck = [f"ckpt={run_dir}"] + (["method=few_shot", "domain.n_references=8", "method.k=2"]
                                if method == "few_shot" else [])
    common = [*ck, "n=7", "engine.batch_size=3", "sampling.max_new_tokens=16", "sampling.stop=[e]"]
    fixed = synth(tmp_path / "fixed", *common, "engine.refill=false")
    written = []
    orig = SampleStore.write
    monkeypatch.setattr(SampleStore, "write", lambda self, rec: (written.append(rec["source"]["index"]),
                                                                 orig(self, rec))[1])
    refill = synth(tmp_path / "refill", *common, "engine.refill=true")
    assert sorted(written) == list(range(7)) and written != list(range(7))  # really out of order
    rf, rr = records(tmp_path / "fixed"), records(tmp_path / "refill")
    assert [r["source"]["index"] for r in rr] == list(range(7))
    assert len({r["n_tokens"] for r in rr}) > 1 and fixed["n_new"] == refill["n_new"] == 7
    assert [(r["id"], r["text"], r["finish_reason"]) for r in rr] == [(r["id"], r["text"], r["finish_reason"])
                                                                      for r in rf]
    more = synth(tmp_path / "fixed", *common, "n=9", "engine.refill=true")
    assert more["n_new"] == 2 and [r["source"]["index"] for r in records(tmp_path / "fixed")] == list(range(9))


def test_refill_in_calls_of_64_batches(run_dir, tmp_path, monkeypatch):
    """More samples than one call takes (64 x batch_size): several engine calls, every sample once,
    the same records as fixed batches."""
    from domino.core.generation.hf import HFEngine
    calls = []
    orig = HFEngine.generate_shared_many
    monkeypatch.setattr(HFEngine, "generate_shared_many",
                        lambda self, prefix, seeds, on_result=None: (calls.append(len(seeds)),
                                                                     orig(self, prefix, seeds, on_result))[1])
    common = [f"ckpt={run_dir}", "n=70", "engine.batch_size=1", "sampling.max_new_tokens=3"]
    synth(tmp_path / "refill", *common, "engine.refill=true")
    assert calls == [64, 6]
    synth(tmp_path / "fixed", *common, "engine.refill=false")
    assert records(tmp_path / "refill") == records(tmp_path / "fixed")


def test_sort_by_index_keeps_each_line_as_written(tmp_path):
    from domino.synthesis.output import SampleStore
    store = SampleStore(tmp_path, {"x": 1}, {})
    recs = [{"id": f"m-{i}", "text": f"line\u2028{i}\r", "source": {"index": i}} for i in (2, 0, 3, 1)]
    for r in recs:
        store.write(r)
    store.close()
    before = (tmp_path / "samples.jsonl").read_bytes().split(b"\n")
    assert store.sort_by_index() and not store.sort_by_index()  # the second time it is in order
    after = (tmp_path / "samples.jsonl").read_bytes()
    assert after.split(b"\n") == [before[1], before[3], before[0], before[2], b""]
    from domino.core.records import iter_jsonl
    assert [r["id"] for _, r in iter_jsonl(tmp_path / "samples.jsonl")] == ["m-0", "m-1", "m-2", "m-3"]


def test_save_dataset(run_dir, tmp_path):
    from datasets import load_from_disk
    res = synth(tmp_path, f"ckpt={run_dir}", "save_dataset=true")
    ds = load_from_disk(res["dataset"])
    assert ds.num_rows == 4 and ds[0]["id"] == "domino-0000000" and json.loads(ds[0]["source"])["index"] == 0


def test_curate_after_sampling_and_on_existing_samples(run_dir, tmp_path):
    """curate=true chains curation after sampling; stage=curate on the same samples finds every
    stage up to date and writes the same SFT set."""
    fast_curation = ["curation.judge.generation.sampling.max_new_tokens=8",
                     "curation.responses.generation.sampling.max_new_tokens=16",
                     "curation.code_checks.enabled=false", "curation.judge.enabled=false"]
    res = synth(tmp_path / "a", f"ckpt={run_dir}", "curate=true", *fast_curation)
    cur = res  # sample + curate: the curation's outputs beside the samples'
    assert Path(cur["sft"]).exists() and Path(cur["report_md"]).exists()
    sft = Path(cur["sft"]).read_text()
    # lineage: the SFT set traces back to the domain prompt and the references behind it
    from domino.core import lineage
    lin = lineage.read(cur["sft"])
    train_lin = lineage.read(run_dir)
    assert train_lin["heldout"] == str((run_dir / "heldout.jsonl").resolve())
    for key in ("train_run", "domain_prompt", "domain_prompt_digest", "references", "heldout", "reference_fingerprint"):
        assert lin[key] == train_lin[key], key
    assert lin["samples"] == str(Path(res["samples"]).resolve()) and lin["sft"] == str(Path(cur["sft"]).resolve())
    assert lineage.heldout_of(cur["sft"]) == train_lin["heldout"]
    again = synth(tmp_path / "b", "stage=curate", f"samples={res['samples']}", *fast_curation)
    assert Path(again["sft"]).read_text() == sft
    with pytest.raises(FileNotFoundError, match="samples="):
        synth(tmp_path / "c", "stage=curate")
    with pytest.raises(ValueError, match="stage="):
        synth(tmp_path, "stage=nope")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(run_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "synthesize.py"), f"ckpt={run_dir / 'domain_prompt.safetensors'}",
           "n=16", "engine.batch_size=2", "sampling.max_new_tokens=24", "progress=false", f"output_dir={out}",
           f"paths.log_dir={tmp_path / 'logs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples, deadline = out / "samples.jsonl", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if samples.exists() and len(samples.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(samples.read_text().splitlines())
    assert 5 <= partial < 16
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = records(out)
    assert (out / "synthesize.log").exists()  # output_dir= is the Hydra run dir: logs beside samples
    reference = synth(tmp_path / "uninterrupted", f"ckpt={run_dir / 'domain_prompt.safetensors'}", "n=16",
                      "sampling.max_new_tokens=24")
    assert reference["n_new"] == 16
    assert [r["id"] for r in resumed] == [f"domino-{i:07d}" for i in range(16)]
    assert resumed == records(tmp_path / "uninterrupted")
