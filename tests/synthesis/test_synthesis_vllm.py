"""engine=vllm on a CUDA machine with vLLM installed (skipped elsewhere): domain tokens go in as
prompt embeddings; records carry the same schema as the HF engine's; a seed reproduces."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ..conftest import CONF, ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_vllm_engine_samples_from_domain_tokens(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from domino.core.backbone import embedded_model_dir, model_config_hash
    from domino.stages import synthesize as run

    # domain tokens for the embedded SmolLM2: random vocabulary rows (the sample_vocab init)
    model_dir = embedded_model_dir()
    conf = AutoConfig.from_pretrained(model_dir)
    weights = load_file(str(next(model_dir.glob("*.safetensors"))))
    emb = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    D = emb[torch.randint(0, emb.shape[0], (8,), generator=torch.Generator().manual_seed(0))].float()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_file({"domain_tokens": D.contiguous()}, str(run_dir / "domain_prompt.safetensors"))
    (run_dir / "domain_prompt.json").write_text(json.dumps({
        "backbone_id": "embedded", "backbone_hash": model_config_hash(conf), "hidden_size": conf.hidden_size,
        "backbone": {"name": "smollm2", "path": "embedded", "dtype": "float32"}, "method": "domino", "k": 8}))

    def synth(out):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="synthesize", overrides=[
                f"ckpt={run_dir / 'domain_prompt.safetensors'}", "engine=vllm", "n=16", "engine.batch_size=8",
                "sampling.max_new_tokens=32", "progress=false", "engine.gpu_memory_utilization=0.3",
                f"paths.output_dir={out}", f"paths.root_dir={ROOT}"])
        return run(cfg)

    res = synth(tmp_path / "a")
    recs = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert res["n_present"] == 16 and [r["id"] for r in recs] == [f"domino-{i:07d}" for i in range(16)]
    assert all(r["method"] == "domino" and r["source"]["engine"] == "vllm" for r in recs)
    assert all(r["finish_reason"] in ("stop", "length") for r in recs)
    assert len({r["text"] for r in recs}) > 1
