"""LoRA SFT on the tiny backbone: assistant-only labels, packing without cross-contamination,
loss goes down, the adapter reloads (peft) and merges to the same outputs, checkpoints hold only
LoRA tensors and resume exactly, bad records are named, every config composes."""
import csv
import itertools
import json
import logging
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from safetensors.torch import load_file

from domino.core.backbone import load_backbone
from domino.core.batching import CPU_FORWARD_COST
from domino.core.records import RecordError
from domino.finetune.data import IGNORE, Collate, as_rows, encode_chat, encode_records, load_sft, pack, sha256_file
from domino.finetune.module import LoRAModule
from domino.finetune.run import PROVENANCE, finetune

from ..conftest import CONF, FIXTURES, ROOT, TINY, StopAt, compose_config

SMALL = FIXTURES / "sft_small.jsonl"
MULTI = FIXTURES / "sft_multiturn.jsonl"
BACKBONES = sorted(p.stem for p in (CONF / "backbone").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))
# 12 records, 2 held out, 10 trained as one full batch (every step sees the same data, whatever the
# epoch's order: Lightning numbers the epoch after a resume from an end-of-epoch checkpoint one too
# high, see docs/finetune.md)
RUN = ["backbone=tiny", f"data={SMALL}", "sft.val_size=2", "sft.batch_size=10", "sft.max_len=96",
       "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "optim.lr=0.02", "optim.warmup_steps=0",
       "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false"]


def label_spans(tok, ids, labels):
    """Decoded runs of labelled tokens."""
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    return spans + ([tok.decode(cur)] if cur else [])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def probe_ids(tok):
    return torch.tensor([encode_chat(tok, load_sft(SMALL)[0]["messages"]).input_ids])


@pytest.fixture(scope="module")
def tok(tiny_backbone):
    return tiny_backbone.tokenizer


def perturbed_lora(**kw) -> LoRAModule:
    """A LoRA module whose B matrices are non-zero (fresh LoRA is a no-op by construction)."""
    m = LoRAModule(TINY, r=4, alpha=8, dropout=0.0, seed=0, **kw)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def lora(tiny_backbone):
    return perturbed_lora()


# ---------------------------------------------------------------------------- records & labels
def test_labels_only_on_assistant_replies(tok):
    for rec in load_sft(MULTI) + load_sft(SMALL)[:3]:
        enc = encode_chat(tok, rec["messages"])
        want = [m["content"] + tok.eos_token for m in rec["messages"] if m["role"] == "assistant"]
        assert label_spans(tok, enc.input_ids, enc.labels) == want
    assert tok.eos_token == "<|im_end|>"  # SmolLM2's end of turn, the token generation stops on


def test_truncation_warns_once_with_count(tok, caplog):
    recs = load_sft(SMALL)
    full = [len(encode_chat(tok, r["messages"]).input_ids) for r in recs]
    max_len = sorted(full)[len(full) // 2]
    n_cut = sum(n > max_len for n in full)
    with caplog.at_level(logging.WARNING, logger="domino.finetune.data"):
        out = encode_records(tok, recs, max_len)
    warns = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warns) == 1 and f"{n_cut} of {len(recs)}" in warns[0] and f"max_len={max_len}" in warns[0]
    assert max(len(e.input_ids) for e in out) == max_len and sum(e.truncated for e in out) == n_cut


def test_packing_keeps_per_example_labels_and_attention(tok, lora):
    enc = [encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:6]]
    rows = pack(enc, 160)
    assert len(rows) < len(enc) and all(len(r.input_ids) <= 160 for r in rows)
    # cut each row where the position ids restart: every piece is one example, labels intact
    pieces = []
    for r in rows:
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        pieces += [(r.input_ids[a:b], r.labels[a:b]) for a, b in zip(starts, starts[1:])]
    assert sorted(pieces) == sorted((e.input_ids, e.labels) for e in enc)
    # packed rows give every example the logits (and the loss) it gets alone
    packed, alone = Collate(tok.pad_token_id, True)(rows), Collate(tok.pad_token_id, False)(as_rows(enc))
    assert "attention_mask" not in packed
    lp = lora(packed["input_ids"], None, packed["position_ids"])
    la = lora(alone["input_ids"], alone["attention_mask"])
    for b, r in enumerate(rows):
        starts = [i for i, p in enumerate(r.position_ids) if p == 0] + [len(r.input_ids)]
        for a, z in zip(starts, starts[1:]):
            k = next(i for i, e in enumerate(enc) if e.input_ids == r.input_ids[a:z])
            torch.testing.assert_close(lp[b, a:z], la[k, : z - a], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        (sp, cp), (sa, ca) = lora.nll_sum(packed), lora.nll_sum(alone)
    assert cp == ca == sum(sum(x != IGNORE for x in e.labels) for e in enc)
    torch.testing.assert_close(sp, sa, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("targets", [None, ("q_proj", "lm_head")])
def test_head_on_labelled_positions_equals_full_logits(tok, lora, targets):
    """The loss and the LoRA gradients of nll_sum (the fused head, or plain autograd where LoRA
    wraps the head) equal cross-entropy over the adapted model's full logits."""
    if targets is not None:
        lora = perturbed_lora(target_modules=targets)
    batch = Collate(tok.pad_token_id, False)(as_rows([encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:3]]))
    params = [p for p in lora.parameters() if p.requires_grad]
    total, count = lora.nll_sum(batch)
    got = torch.autograd.grad(total, params)
    full = lora(batch["input_ids"], batch["attention_mask"])[:, :-1]
    ref = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-4)
    for g, r in zip(got, torch.autograd.grad(ref, params)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert count == (batch["labels"][:, 1:] != IGNORE).sum()


def test_right_padded_rows_run_without_a_mask_and_lose_nothing(tok, lora, monkeypatch):
    """Collate's unpacked (right-padded) rows go to the model without attention mask or position ids
    (SDPA's causal path), with the loss and LoRA gradients of the masked forward; any other layout
    keeps what the batch gives."""
    from domino.finetune import module
    rows = as_rows([encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:4]])
    batch = Collate(tok.pad_token_id, False)(rows)
    assert not batch["attention_mask"].all()  # padded: the rows differ in length
    assert module.attention_inputs(batch) == (None, None)
    packed = Collate(tok.pad_token_id, True)(pack([encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:6]], 160))
    assert module.attention_inputs(packed) == (None, packed["position_ids"])
    for name, edit in [("left-padded", lambda b: b["attention_mask"].flip(1)),
                       ("a hole", lambda b: b["attention_mask"].index_fill(1, torch.tensor([1]), 0))]:
        odd = {**batch, "attention_mask": edit(batch)}
        got = module.attention_inputs(odd)
        assert got[0] is odd["attention_mask"] and got[1] is odd["position_ids"], name
    shifted = {**batch, "position_ids": batch["position_ids"] + 1}
    assert module.attention_inputs(shifted)[0] is shifted["attention_mask"]

    params = [p for p in lora.parameters() if p.requires_grad]
    total, count = lora.nll_sum(batch)
    got = torch.autograd.grad(total, params)
    monkeypatch.setattr(module, "attention_inputs", lambda b: (b.get("attention_mask"), b.get("position_ids")))
    ref_total, ref_count = lora.nll_sum(batch)
    assert count == ref_count
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-5)
    for g, r in zip(got, torch.autograd.grad(ref_total, params)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_padded_batch_runs_as_length_groups_and_loses_nothing(tok, lora, monkeypatch):
    """With a forward cost, a right-padded batch's decoder runs once per length group, rows cut to
    the group's longest: the loss, the count and every LoRA gradient equal those of one forward
    over the whole batch. A kept mask (packed rows), or no cost, is one forward."""
    from domino.finetune import module
    rows = as_rows([encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:5]])
    batch = Collate(tok.pad_token_id, False)(rows)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 2
    calls = []
    hook = lora.model.get_base_model().get_decoder().register_forward_hook(
        lambda m, args, kw, out: calls.append(kw["input_ids"].shape), with_kwargs=True)
    params = [p for p in lora.parameters() if p.requires_grad]
    try:
        results = {}
        for cost in (0, None):
            calls.clear()
            monkeypatch.setitem(lora.hparams, "forward_cost", cost)
            total, count = lora.nll_sum(batch)
            results[cost] = (total, count, torch.autograd.grad(total, params), list(calls))
        assert results[None][3] == [batch["input_ids"].shape]
        groups = module.length_groups(lengths, 0)
        assert sorted(results[0][3]) == sorted(torch.Size([len(g), max(lengths[i] for i in g)]) for g in groups)
        assert results[0][1] == results[None][1] == (batch["labels"][:, 1:] != IGNORE).sum()
        torch.testing.assert_close(results[0][0], results[None][0], rtol=1e-6, atol=1e-5)
        for g, r in zip(results[0][2], results[None][2]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
        monkeypatch.setitem(lora.hparams, "forward_cost", "auto")
        assert lora.forward_cost() == CPU_FORWARD_COST
        enc = [encode_chat(tok, r["messages"]) for r in load_sft(SMALL)[:6]]
        packed = Collate(tok.pad_token_id, True)(pack(enc, 160))
        calls.clear()
        with torch.no_grad():
            lora.nll_sum(packed)
        assert calls == [packed["input_ids"].shape]
    finally:
        hook.remove()


@pytest.mark.parametrize("bad", ["fast", -1, True, [64]])
def test_forward_cost_is_checked(bad):
    with pytest.raises(ValueError, match=r"sft\.forward_cost"):
        LoRAModule(TINY, r=4, alpha=8, dropout=0.0, forward_cost=bad)


@pytest.mark.parametrize("body,line,match", [
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{oops\n',
     2, "malformed JSON"),
    ('{"id": "a", "text": "no messages"}\n', 1, r"missing field\(s\) \['messages'\]"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n', 1, "ending with assistant"),
    ('{"id": "a", "messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}\n', 1,
     "alternating"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}\n', 1,
     "non-empty string"),
    ('{"id": "a", "messages": []}\n', 1, "non-empty list"),
])
def test_bad_records_are_named(tmp_path, body, line, match):
    path = tmp_path / "sft.jsonl"
    path.write_text(body)
    with pytest.raises(RecordError, match=match) as e:
        load_sft(path)
    assert f"{path}:{line}:" in str(e.value)


def test_bad_role_fixture_and_empty_file(tmp_path):
    with pytest.raises(RecordError, match=r"sft_bad_role.jsonl:2: messages\[1\].role='bot'"):
        load_sft(FIXTURES / "sft_bad_role.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(RecordError, match="no SFT records"):
        load_sft(empty)


# ---------------------------------------------------------------------------- module & adapter
def test_only_lora_dropout_trains(lora):
    lora.train()
    modes = {n: m.training for n, m in lora.model.named_modules()}
    assert all(v for n, v in modes.items() if n.endswith("lora_dropout"))
    assert not any(v for n, v in modes.items() if "dropout" not in n)
    assert all(n.split(".")[-3] in ("lora_A", "lora_B") for n in lora.trainable_keys())
    lora.eval()


def test_exported_adapter_reloads_with_peft_identically(tok, lora, tmp_path):
    from peft import PeftModel
    lora.export_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = load_backbone(**TINY).model
    ids = probe_ids(tok)
    base_out = logits(base, ids)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, ids), lora(ids), rtol=0, atol=1e-6)
    assert (lora(ids) - base_out).abs().max() > 1e-2  # the adapter does change the model


# ---------------------------------------------------------------------------- end to end
def read_metric(out_dir, name):
    with open(out_dir / "csv" / "metrics.csv") as fh:
        return [float(r[name]) for r in csv.DictReader(fh) if r.get(name)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 8-step run (merge=true) shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("finetune")
    cfg = compose_config("finetune", RUN + ["trainer.max_steps=8", "merge=true", "export=last"], out)
    return out, finetune(cfg)


@pytest.mark.slow
def test_training_lowers_loss(run):
    out, result = run
    losses, val = read_metric(out, "train/loss"), read_metric(out, "val/loss")
    assert len(losses) == 8 and len(val) == 8
    assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert val[-1] < val[0], val
    assert result["metrics"]["val/loss"] == pytest.approx(val[-1])


@pytest.mark.slow
def test_run_exports_adapter_with_provenance_and_lora_only_checkpoint(run):
    out, result = run
    adapter = out / "adapter"
    assert result["adapter"] == str(adapter)
    assert set(load_file(adapter / "adapter_model.safetensors")) and all(
        ".lora_A." in k or ".lora_B." in k for k in load_file(adapter / "adapter_model.safetensors"))
    prov = json.loads((adapter / PROVENANCE).read_text())
    assert prov["data"]["sha256"] == sha256_file(SMALL) and prov["data"]["n_train"] == 10
    assert prov["base_model"]["id"].startswith("tiny:") and len(prov["base_model"]["model_hash"]) == 16
    assert prov["config"]["lora"]["r"] == 4 and prov["steps"] == 8 and prov["exported_from"] == "last"
    # lineage: the adapter names its SFT set (this fixture has no upstream lineage of its own)
    lin = json.loads((adapter / "lineage.json").read_text())
    assert prov["lineage"] == lin and lin["sft"] == str(SMALL.resolve()) and lin["sft_sha256"] == sha256_file(SMALL)
    assert lin["adapter"] == str(adapter.resolve())
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    keys = set(ckpt["state_dict"])
    want = {f"model.base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{ab}.default.weight"
            for i, p, ab in itertools.product(range(2), "qkvo", "AB")}
    assert keys == want
    assert ckpt["domino_finetune"]["backbone_hash"] == prov["base_model"]["model_hash"]


@pytest.mark.slow
def test_run_adapter_equals_checkpoint_and_merged_weights(run, tok):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _ = run
    ids = probe_ids(tok)
    m = LoRAModule(TINY, r=4, alpha=8, dropout=0.0)
    m.load_trainable(out / "checkpoints" / "last.ckpt")  # the in-training weights at the last step
    adapted = PeftModel.from_pretrained(load_backbone(**TINY).model, str(out / "adapter")).eval()
    torch.testing.assert_close(logits(adapted, ids), m.eval()(ids), rtol=0, atol=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged")).eval()
    torch.testing.assert_close(logits(merged, ids), logits(adapted, ids), rtol=1e-4, atol=1e-4)
    assert (out / "merged" / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_resume_continues_exactly(run, tmp_path, monkeypatch):
    """An 8-step run interrupted after 2 steps and resumed from its LoRA-only last.ckpt ends with
    the same adapter as the uninterrupted 8-step run (LoRA tensors, optimizer and schedule restored)."""
    out, _ = run
    import domino.finetune.run as ft_run
    callbacks_for = ft_run.callbacks_for
    monkeypatch.setattr(ft_run, "callbacks_for", lambda *a: (lambda cb, best: (cb + [StopAt(2)], best))(
        *callbacks_for(*a)))
    finetune(compose_config("finetune", RUN + ["trainer.max_steps=8", "export=last"], tmp_path / "a"))
    monkeypatch.setattr(ft_run, "callbacks_for", callbacks_for)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    finetune(compose_config("finetune", RUN + ["trainer.max_steps=8", "export=last", f"ckpt_path={last}"],
                            tmp_path / "b"))
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    want = load_file(out / "adapter" / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- configs
def test_finetune_composes_with_every_backbone_and_trainer(compose):
    for backbone, trainer in itertools.product(BACKBONES, TRAINERS):
        cfg = compose("finetune", [f"backbone={backbone}", f"trainer={trainer}", "data=/x/sft.jsonl"])
        c = OmegaConf.to_container(cfg, resolve=True)
        assert c["task_name"] == "finetune" and c["backbone"]["name"] == backbone
        assert c["trainer"]["_target_"] == "lightning.pytorch.Trainer"
        assert c["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    cfg = compose("finetune", ["trainer=deepspeed", "backbone=qwen", "lora=all_linear", "data=/x/sft.jsonl"])
    assert cfg.trainer.strategy.stage == 2 and cfg.backbone.path == "Qwen/Qwen2.5-Coder-7B-Instruct"
    assert "down_proj" in cfg.lora.target_modules and cfg.lora.r == 16


def test_missing_data_is_named(compose, tmp_path):
    with pytest.raises(MissingMandatoryValue, match="data"):
        finetune(compose("finetune", ["backbone=tiny"], tmp_path))


@pytest.mark.slow
def test_entry_point_composes_from_cli():
    out = subprocess.run([sys.executable, "finetune.py", "data=run/sft.jsonl", "backbone=qwen", "trainer=deepspeed",
                          "--cfg", "job"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.data == "run/sft.jsonl" and cfg.trainer.strategy.stage == 2 and cfg.task_name == "finetune"
