"""CUDA paths on the tiny backbone (skipped without a GPU, see conftest): the efficient objective
equals the oracle on the GPU in fp32 and bf16, train.py runs with trainer=gpu|ddp|deepspeed in bf16
and resumes from checkpoints that hold only the soft tokens, the HF engine's greedy samples equal
transformers' cached `generate`, LoRA fine-tuning and evaluate.py's generation run on CUDA."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, SMALL_TRAIN, TINY

pytestmark = pytest.mark.gpu

PROMPT_KEYS = {"prompts.domain", "prompts.samples"}


def _cuda_backbone(dtype):
    from domino.core.backbone import load_backbone
    bb = load_backbone(**{**TINY, "dtype": dtype})
    bb.model.cuda()
    return bb


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_efficient_equals_straightforward_on_cuda(dtype, tol):
    from domino.training.objective import combine, straightforward_nll
    from domino.training.objective_cached import cached_nll
    bb = _cuda_backbone(dtype)
    g = torch.Generator().manual_seed(0)
    B, k, T = 3, 4, 24
    ids = torch.randint(0, bb.model.config.vocab_size, (B, T), generator=g).cuda()
    am = torch.ones_like(ids)
    am[1, 17:] = 0  # right padding on one row
    W = bb.embed.weight.detach().float()
    D0 = W[torch.randint(0, W.shape[0], (k,), generator=g).cuda()].clone()
    S0 = W[torch.randint(0, W.shape[0], (B * k,), generator=g).cuda()].view(B, k, -1).clone()
    out = {}
    for name, fn in (("oracle", straightforward_nll), ("efficient", cached_nll)):
        D, S = D0.clone().requires_grad_(), S0.clone().requires_grad_()
        loss = combine(*fn(bb.model, D, S, ids, am), form="paper")["loss"]
        loss.backward()
        out[name] = (loss.item(), D.grad, S.grad)
    (lo, gDo, gSo), (le, gDe, gSe) = out["oracle"], out["efficient"]
    assert le == pytest.approx(lo, abs=tol * max(1.0, abs(lo)))
    for a, b in ((gDe, gDo), (gSe, gSo)):
        assert a.device.type == "cuda"
        assert ((a - b).norm() / b.norm()).item() < (1e-3 if dtype == "float32" else 0.1)


@torch.no_grad()
def test_hf_engine_greedy_equals_cached_generate_on_cuda():
    from domino.core.generation.hf import HFEngine
    from domino.core.generation.params import SamplingParams
    bb = _cuda_backbone("float32")
    W = bb.embed.weight
    D = W[torch.randint(0, W.shape[0], (6,), generator=torch.Generator().manual_seed(1)).cuda()]
    e = HFEngine(bb.model, bb.tokenizer, SamplingParams(temperature=0.0, max_new_tokens=24, min_new_tokens=24,
                                                        repetition_penalty=3.0), batch_size=4)
    gens = e.generate_shared(e.prefill(D), [0, 1, 2, 3])
    ref = bb.model.generate(inputs_embeds=D[None], do_sample=False, max_new_tokens=24, min_new_tokens=24,
                            use_cache=True, repetition_penalty=3.0, eos_token_id=None, pad_token_id=0)[0]
    assert len(set(ref.tolist())) > 5
    for g in gens:
        assert g.token_ids == ref.tolist()


def _train_cli(out, trainer, *extra):
    cmd = [sys.executable, "train.py", f"hydra.run.dir={out}", f"trainer={trainer}", "trainer.devices=1",
           "backbone.dtype=bfloat16", "checkpoint_every_n_steps=2", *SMALL_TRAIN, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def _saved_keys(ckpt):
    """Tensor names a Lightning checkpoint stores: a file, or DeepSpeed's directory."""
    if ckpt.is_file():
        sd = torch.load(ckpt, map_location="cpu", weights_only=False)
        return set(sd["state_dict"]), sd["global_step"]
    states = list(ckpt.rglob("mp_rank_00_model_states.pt"))
    assert states, sorted(str(p) for p in ckpt.rglob("*"))
    sd = torch.load(states[0], map_location="cpu", weights_only=False)
    return set(sd["module"]), sd.get("global_step")


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["gpu", "ddp", "deepspeed"])
def test_train_entry_point_bf16_checkpoint_and_resume(trainer, tmp_path):
    if trainer == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    a = tmp_path / "a"
    _train_cli(a, trainer, "trainer.max_steps=4")
    ckpt = a / "checkpoints" / "last.ckpt"
    keys, step = _saved_keys(ckpt)
    assert keys == PROMPT_KEYS, keys
    assert (a / "domain_prompt.safetensors").exists()
    b = tmp_path / "b"
    _train_cli(b, trainer, "trainer.max_steps=6", f"ckpt_path={ckpt}")
    meta = json.loads((b / "domain_prompt.json").read_text())
    assert meta["steps"] == 6


@pytest.mark.slow
def test_finetune_lora_bf16_on_cuda(tmp_path):
    cmd = [sys.executable, "finetune.py", f"hydra.run.dir={tmp_path}", "backbone=tiny", "backbone.dtype=bfloat16",
           "trainer=gpu", f"data={ROOT / 'tests/fixtures/sft_small.jsonl'}", "sft.val_size=2", "sft.batch_size=4",
           "sft.max_len=96", "lora.r=4", "lora.alpha=8", "trainer.max_steps=4", "export=last",
           "trainer.enable_progress_bar=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_evaluate_generates_on_cuda(tmp_path):
    cmd = [sys.executable, "evaluate.py", f"hydra.run.dir={tmp_path}", f"cache_path={tmp_path / 'c.jsonl'}",
           "backbone=tiny", "backbone.dtype=bfloat16", "benchmark.limit=2", "n_samples=2", "k=[1,2]",
           "sampling.max_new_tokens=8", "sampling.temperature=0.8", "engine.batch_size=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["samples"] == 4
