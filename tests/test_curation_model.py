"""The model stages on a real (tiny, random) backbone: chat template, batched left-padded greedy
decoding through the shared engine (domino.generation.hf), and the judge/responses stages driven by it."""
import json

import pytest
from omegaconf import OmegaConf

from domino.curation.generation import HFChatGenerator, release_models
from domino.curation.run import run_curation
from domino.records import read_jsonl

from .conftest import CONF, TINY


def test_hf_chat_generator_batches_deterministically(tiny_backbone):
    gen = HFChatGenerator(tiny_backbone, sampling={"temperature": 0.0, "max_new_tokens": 6}, batch_size=2)
    convs = [[{"role": "user", "content": t}] for t in ("hi", "a much longer prompt than the first one", "x")]
    a, b = gen(convs), gen(convs)
    assert len(a) == 3 and all(isinstance(t, str) for t in a) and a == b
    assert gen.engine.n_forward > 0
    ids = gen.encode(convs[0])
    assert gen.tok.decode(ids).endswith("<|im_start|>assistant\n")  # generation prompt appended


@pytest.mark.slow
def test_model_stages_with_tiny_backbone(tmp_path):
    recs = [{"id": f"s-{i}", "text": t} for i, t in enumerate([
        "Write a function that returns the sum of the squares of a list of integers.",
        "Given a string, return it with the order of its words reversed and single spaces.",
        "Compute the number of distinct prime factors of a positive integer n up to ten million."])]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = OmegaConf.load(CONF / "curation" / "default.yaml")
    for s in ("normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate"):
        cfg[s].enabled = False
    cfg.judge.keep_unknown = True  # a random model will not grade; let its answers reach responses
    for s in ("judge", "responses"):
        cfg[s].generation.sampling.max_new_tokens = 8
        cfg[s].generation.batch_size = 2
    backbone = {**TINY, "cache_dir": None}
    try:
        run_curation(cfg, tmp_path / "samples.jsonl", tmp_path, backbone=backbone, progress=False)
    finally:
        release_models()
    cur = tmp_path / "curation"
    judge_meta = json.loads((cur / "06_judge.meta.json").read_text())
    assert sum(judge_meta["grades"].values()) == 3 and judge_meta["model"]["path"] == "tiny"
    responses = read_jsonl(cur / "07_responses.jsonl") + read_jsonl(cur / "07_responses.dropped.jsonl")
    assert sorted(r["id"] for r in responses) == ["s-0", "s-1", "s-2"]
    assert all(isinstance(r["response"], str) for r in responses)
    assert json.loads((tmp_path / "curation_report.json").read_text())["funnel"][-1]["n_in"] == \
        sum(1 for r in responses if "dropped" not in r)


def test_logprob_judge_scores_match_a_naive_oracle(tiny_backbone):
    import torch

    from domino.curation.judge import LABELS
    gen = HFChatGenerator(tiny_backbone, sampling={"max_new_tokens": 4}, batch_size=2)
    conv = [{"role": "user", "content": "Grade this problem: add two numbers."}]
    scores = gen.option_scores(conv, list(LABELS), "Score:")
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    for label, got in zip(LABELS, scores):  # one unpadded sequence per label, full logits
        base = gen.encode(conv) + tok("Score:", add_special_tokens=False)["input_ids"]
        opt = tok(" " + label, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([base + opt], device=model.device)).logits[0].float().log_softmax(-1)
        want = sum(float(logp[len(base) - 1 + j, t]) for j, t in enumerate(opt))
        assert got == pytest.approx(want, abs=1e-4)
    assert gen.choose([conv], list(LABELS), "Score:") == [LABELS[max(range(5), key=lambda i: scores[i])]]
