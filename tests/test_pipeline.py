"""The whole pipeline, as `make demo` runs it (scripts/demo.sh), on the tiny backbone."""
import json
import os
import subprocess

import pytest
import torch

from .conftest import ROOT, TINY

TINY_STAGES = {
    "DEMO_ARGS": "backbone=tiny",
    "DEMO_TRAIN_ARGS": "domain.n_references=8 data.max_len=48 data.val_size=4 prompt.k=4 prompt.l=4 "
                       "trainer.max_steps=2 trainer.enable_progress_bar=false",
    "DEMO_SYNTH_ARGS": "n=8 sampling.max_new_tokens=24 progress=false curation.judge.enabled=false "
                       "curation.responses.generation.sampling.max_new_tokens=24 curation.code_checks.enabled=false "
                       "curation.responses.generation.sampling.temperature=1.0 "
                       "+curation.responses.generation.sampling.min_new_tokens=8",
    "DEMO_FINETUNE_ARGS": "trainer.max_steps=2 sft.val_size=2 sft.batch_size=2 sft.max_len=128 "
                          "trainer.enable_progress_bar=false",
    "DEMO_EVAL_ARGS": "benchmark.limit=3 sampling.max_new_tokens=16 engine.batch_size=3",
}


def jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_on_tiny(tmp_path):
    env = {**os.environ, **TINY_STAGES, "DEMO_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # every stage's output exists and parses
    assert len(jsonl(tmp_path / "train" / "references.jsonl")) == 8
    assert json.loads((tmp_path / "train" / "domain_prompt.json").read_text())["k"] == 4
    samples = jsonl(tmp_path / "synthesize" / "samples.jsonl")
    assert len(samples) == 8 and all(s["method"] == "domino" for s in samples)
    sft = jsonl(tmp_path / "synthesize" / "sft.jsonl")
    assert sft and all([m["role"] for m in r["messages"]][-2:] == ["user", "assistant"] for r in sft)
    assert json.loads((tmp_path / "synthesize" / "curation_report.json").read_text())
    for ev in ("eval_base", "eval_finetuned"):
        summary = json.loads((tmp_path / ev / "summary.json").read_text())
        assert summary["tasks"] == 3 and 0.0 <= summary["pass@1"] <= 1.0
    fin = json.loads((tmp_path / "eval_finetuned" / "summary.json").read_text())
    assert fin["adapter"]
    # evaluated without benchmark.path: the adapter's lineage led back to the training run's split
    held = str((tmp_path / "train" / "heldout.jsonl").resolve())
    assert fin["benchmark"]["path"] == held and fin["lineage"]["heldout"] == held
    assert fin["lineage"]["domain_prompt"] == str((tmp_path / "train" / "domain_prompt.safetensors").resolve())
    table = (tmp_path / "demo_report.md").read_text()
    assert "evaluate (fine-tuned)" in table and table in proc.stdout
    # it ends with DOMINO vs the plain soft prompt trained and sampled the same way
    dq = json.loads((tmp_path / "compare" / "data_quality.json").read_text())
    assert set(dq["rows"]) == {"domino", "soft_prompt", "heldout"}
    assert json.loads((tmp_path / "train_soft_prompt" / "domain_prompt.json").read_text())["method"] == "soft_prompt"
    assert "DOMINO vs plain soft prompt" in table and "| soft_prompt | 8 |" in table
    # the adapter changes the model's outputs
    from peft import PeftModel

    from domino.core.backbone import load_backbone
    base = load_backbone(**TINY).model
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "finetune" / "adapter"))
    assert not torch.allclose(tuned(ids).logits, before)
    # a second run finds every stage done and only reprints the table
    again = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 7
