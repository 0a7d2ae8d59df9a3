"""End to end on the tiny backbone: training lowers the loss, checkpoints hold only the soft
tokens and resume, the export carries its provenance, a multirun sweep completes."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from domino.core.batching import pad_batch, tokenize_texts
from domino.training.module import DominoModule
from domino.training.run import train

from ..conftest import ROOT, SMALL_TRAIN, TINY

PIN_TEXTS = ["def f(x):\n    return x", "import os\nprint(1)", "a = [1, 2, 3]", "while True:\n    pass"]


@pytest.mark.parametrize("form,pinned", [("paper", 11.91328), ("official", 10.817687)])
def test_initial_loss_is_pinned(form, pinned):
    """Seeded tiny model + seeded prompts: the first loss is a fixed number (regression pin)."""
    m = DominoModule(backbone=TINY, n_references=4, objective={"form": form}, prompt={"k": 4, "l": 4}, seed=0)
    ids, mask = pad_batch(tokenize_texts(m.tokenizer, PIN_TEXTS, 32), m.tokenizer.pad_token_id)
    out = m.losses({"index": torch.arange(4), "input_ids": ids, "attention_mask": mask})
    assert out["loss"].item() == pytest.approx(pinned, abs=1e-3)


def test_unknown_layout_is_refused_before_training():
    with pytest.raises(ValueError, match="objective.layout='fused'"):
        DominoModule(backbone=TINY, n_references=4, objective={"layout": "fused"}, prompt={"k": 2, "l": 2})


def read_metric(out_dir, name):
    with open(out_dir / "csv" / "metrics.csv") as fh:
        return [float(r[name]) for r in csv.DictReader(fh) if r.get(name)]


def test_training_lowers_loss_and_exports(compose, tmp_path):
    # full batch (8 references, batch 8) so every step sees the same texts
    cfg = compose("train", SMALL_TRAIN + ["data.batch_size=8", "trainer.max_steps=8", "optim.lr_domain=0.05",
                                          "optim.lr_sample=0.05", "optim.warmup_steps=0"], tmp_path)
    result = train(cfg)
    losses = read_metric(tmp_path, "train/loss")
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.05, losses
    assert read_metric(tmp_path, "val/nll_dom")  # held-out NLL under D alone is logged
    for name in ("train/loss_dom", "train/loss_con", "train/contrast_gap"):
        assert read_metric(tmp_path, name)
    D = load_file(tmp_path / "domain_prompt.safetensors")
    assert list(D) == ["domain_tokens"] and D["domain_tokens"].shape == (4, 64)
    meta = json.loads((tmp_path / "domain_prompt.json").read_text())
    for key in ("backbone_id", "backbone_hash", "config_hash", "hidden_size", "k", "method", "objective",
                "reference_fingerprint", "seed", "git_commit"):
        assert key in meta
    assert meta["k"] == 4 and meta["method"] == "domino" and meta["steps"] == 8
    refs = [json.loads(x) for x in (tmp_path / "references.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(refs) == 8 and len(held) == 156 and result["domain_prompt"].endswith(".safetensors")


def test_checkpoint_holds_only_soft_tokens_and_resumes(compose, tmp_path):
    cfg = compose("train", SMALL_TRAIN + ["trainer.max_steps=2"], tmp_path)
    train(cfg)
    ckpt_path = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"prompts.domain", "prompts.samples"}
    assert ckpt["state_dict"]["prompts.samples"].shape == (8, 4, 64)
    assert "backbone" not in json.dumps(list(ckpt["state_dict"]))
    # round trip: rebuilt from hyperparameters alone, same tensors
    m = DominoModule.load_from_checkpoint(ckpt_path)
    torch.testing.assert_close(m.prompts.domain.detach(), ckpt["state_dict"]["prompts.domain"])
    # resume to 4 steps from the 2-step checkpoint
    out2 = tmp_path / "resumed"
    cfg2 = compose("train", SMALL_TRAIN + ["trainer.max_steps=4", f"ckpt_path={ckpt_path}"], out2)
    train(cfg2)
    assert json.loads((out2 / "domain_prompt.json").read_text())["steps"] == 4
    assert len(read_metric(out2, "train/loss")) == 2  # only the two new steps ran


def test_checkpoint_with_wrong_keys_is_refused(compose, tmp_path):
    cfg = compose("train", SMALL_TRAIN, tmp_path)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["state_dict"]["prompts.extra"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="unexpected.*prompts.extra"):
        DominoModule.load_from_checkpoint(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("override", ["objective=soft_prompt", "objective.lambda=0", "prompt.l=0"])
def test_soft_prompt_baseline_has_no_sample_tokens(compose, tmp_path, override):
    """Sample tokens follow from the config (prompt.l > 0 and objective.lambda > 0), whatever its name."""
    cfg = compose("train", SMALL_TRAIN + [override], tmp_path)
    train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {"prompts.domain"}
    assert read_metric(tmp_path, "train/loss") and not read_metric(tmp_path, "train/loss_con")


def test_too_few_references_is_a_clear_error(compose, tmp_path):
    cfg = compose("train", SMALL_TRAIN + ["domain.n_references=1"], tmp_path)
    with pytest.raises(ValueError, match="at least 2 references"):
        train(cfg)


@pytest.mark.slow
def test_multirun_sweep_completes(tmp_path):
    args = [sys.executable, "train.py", "-m", "objective.lambda=0,1", f"hydra.sweep.dir={tmp_path}"] + SMALL_TRAIN
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lams = sorted(json.loads((tmp_path / str(i) / "domain_prompt.json").read_text())["objective"]["lambda"]
                  for i in (0, 1))
    assert lams == [0.0, 1.0]


def test_epoch_means_are_torchmetrics_running_means_of_the_steps(compose, tmp_path):
    """train/<term>_epoch (a torchmetrics MeanMetric, synced across ranks) is the batch-weighted
    mean of the epoch's step values; the metrics never reach the checkpoint."""
    cfg = compose("train", SMALL_TRAIN + ["trainer.max_steps=4", "checkpoint_every_n_steps=0"], tmp_path)
    train(cfg)
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    steps = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    epochs = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert len(steps) == 4 and len(epochs) == 2  # 8 references in batches of 4: two steps an epoch
    assert epochs == pytest.approx([(steps[0] + steps[1]) / 2, (steps[2] + steps[3]) / 2], rel=1e-6)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert all(k.startswith("prompts.") for k in ckpt["state_dict"])


def test_logger_none_trains_and_callbacks_none_writes_no_checkpoint(compose, tmp_path):
    """The two one-override switches really run: no logger (the learning-rate monitor is dropped,
    Lightning refuses it without one), and no callbacks (no checkpoints at all)."""
    res = train(compose("train", SMALL_TRAIN + ["logger=none"], tmp_path / "a"))
    assert Path(res["domain_prompt"]).exists() and not (tmp_path / "a" / "csv").exists()
    assert (tmp_path / "a" / "checkpoints" / "last.ckpt").exists()
    res = train(compose("train", SMALL_TRAIN + ["callbacks=none"], tmp_path / "b"))
    assert Path(res["domain_prompt"]).exists() and not (tmp_path / "b" / "checkpoints").exists()


def test_diagnostics_measure_sample_token_drift_without_building_a_graph(monkeypatch):
    """measure() runs under no_grad (a graph over every reference batch held 24 GB at the 0.5B),
    and reports how far D and every S_i moved from their init."""
    from domino.training import diagnostics as dg
    m = DominoModule(backbone=TINY, n_references=4, prompt={"k": 2, "l": 2})
    seen = []
    real = m.nll
    monkeypatch.setattr(m, "nll", lambda *a, **k: (seen.append(torch.is_grad_enabled()), real(*a, **k))[1])
    ids = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
    d0, s0 = m.prompts.export_domain().clone(), dg.all_sample_tokens(m)
    with torch.no_grad():
        m.prompts.samples[1] += 0.5
    out = dg.measure(m, ids, ids[:2], 2, d0, s0)
    assert seen and not any(seen)
    assert out["d_drift"] == 0.0 and out["s_drift"] > 0
    assert out["s_move_max_std"] == pytest.approx(0.5 / s0.std().item(), rel=1e-5)
    assert dg.all_sample_tokens(DominoModule(backbone=TINY, n_references=4, prompt={"k": 2, "l": 2},
                                             objective={"lambda": 0.0})) is None
