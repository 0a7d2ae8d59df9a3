"""The one engine factory (domino.core.generation.factory): every stage that decodes builds its engine
from the same schema, with the same thread/device rule and the same vLLM settings."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from domino.core.generation import factory
from domino.core.generation.params import SamplingParams

from ..conftest import CONF, TINY


class Recorder:
    made: list[dict] = []

    def __init__(self, model_path, tokenizer_path, params, **kw):
        Recorder.made.append({"model_path": model_path, "params": params, **kw})
        self.name, self.params = "vllm", params


@pytest.fixture()
def recorder(monkeypatch):
    import domino.core.generation.vllm as V
    Recorder.made = []
    monkeypatch.setattr(V, "VLLMEngine", Recorder)
    return Recorder


def test_the_vllm_group_reaches_the_engine_unchanged(recorder, tmp_path):
    ecfg = factory.engine_config(OmegaConf.to_container(OmegaConf.load(CONF / "engine" / "vllm.yaml")))
    factory.open_vllm({"path": str(tmp_path)}, ecfg, SamplingParams(), 7, prompt_embeds=True)
    made = recorder.made[0]
    assert made["model_path"] == str(tmp_path) and made["seed"] == 7 and made["prompt_embeds"] is True
    for k in factory.VLLM_KEYS:
        assert made[k] == ecfg[k], k
    assert made["batch_size"] == ecfg["batch_size"]


def test_every_stage_opens_vllm_through_the_factory(recorder, tmp_path, tiny_backbone):
    """Evaluation and curation hand their (differently spelt) settings to the same constructor."""
    from domino.core.generation import chat as G
    from domino.evaluation.generation import build_engine
    tiny_backbone.model.save_pretrained(tmp_path)
    tiny_backbone.tokenizer.save_pretrained(tmp_path)
    ecfg = {"name": "vllm", "gpu_memory_utilization": 0.4, "enforce_eager": True}
    build_engine({"path": str(tmp_path)}, ecfg, SamplingParams(), None, 1)
    G._release_vllm()
    older = {"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.4, "enforce_eager": True}}
    G._vllm_engine(str(tmp_path), False, factory.vllm_kwargs(G.stage_engine(older)), SamplingParams(), 1)
    G._release_vllm()
    (a, b) = recorder.made
    assert {k: a[k] for k in factory.VLLM_KEYS} == {k: b[k] for k in factory.VLLM_KEYS}
    assert a["gpu_memory_utilization"] == 0.4 and a["enforce_eager"] is True and a["prompt_embeds"] is False


def test_runtime_sets_threads_and_resolves_the_device():
    before = torch.get_num_threads()
    try:
        assert factory.runtime({"device": "cpu", "num_threads": 1}) == "cpu" and torch.get_num_threads() == 1
        assert factory.runtime({}) == ("cuda" if torch.cuda.is_available() else "cpu")
    finally:
        torch.set_num_threads(before)


def test_load_model_applies_the_engine_dtype_over_the_backbones():
    bb = factory.load_model({**TINY, "dtype": "float32"}, {"dtype": "bfloat16", "device": "cpu"})
    assert bb.dtype == "bfloat16" and bb.model.get_input_embeddings().weight.dtype == torch.bfloat16
    bb = factory.load_model({**TINY, "dtype": "float32"}, {"device": "cpu"})
    assert bb.dtype == "float32"
    assert factory.hf_identity(bb)["vocab_size"] == bb.model.config.vocab_size


def test_engine_config_spellings():
    assert factory.engine_config(None) == {"name": "hf"}
    assert factory.engine_config({"name": None, "batch_size": 4}) == {"name": "hf", "batch_size": 4}
    assert factory.engine_config("vllm", 3) == {"name": "vllm", "batch_size": 3}
    with pytest.raises(ValueError, match=r"engine='tgi': expected one of"):
        factory.engine_config("tgi")


@pytest.mark.parametrize("mode", [True, False])
def test_every_stage_hands_engine_packed_weights_to_the_hf_engine(mode, monkeypatch):
    """engine.packed_weights reaches the HF engine of evaluation, synthesis and curation's chat
    stages (bf16 tiny model: true packs where oneDNN can, false never does)."""
    from domino.core.generation import chat as G
    from domino.core.generation import hf, packed
    from domino.evaluation.generation import build_engine
    from domino.synthesis.methods import Plan
    from domino.synthesis.run import _build_engine
    seen = []
    real = packed.should_pack
    monkeypatch.setattr(packed, "should_pack", lambda model, m: seen.append(m) or real(model, m))
    bcfg = {**TINY, "dtype": "bfloat16"}
    ecfg = {"name": "hf", "device": "cpu", "packed_weights": mode, "batch_size": 2}
    if mode and not packed.supported():
        pytest.skip("no oneDNN bf16 on this CPU/torch")
    engines = [build_engine(bcfg, ecfg, SamplingParams(), None, 0)[0],
               _build_engine({"engine": ecfg, "seed": 0}, bcfg, {}, lambda tok, ident: Plan(method="prompt"))[0],
               G.build_generator(bcfg, None, {"engine": ecfg}, where="curation.judge.generation").engine]
    G.release_models()
    assert seen == [mode] * 3
    assert all(isinstance(e, hf.HFEngine) and e.pack is mode for e in engines)
    assert "packed_weights" in factory.HF_KEYS and "packed_weights" in factory.RUNTIME_KEYS
    for yaml in (CONF / "engine" / "hf.yaml", CONF / "curation" / "default.yaml"):
        conf = OmegaConf.load(yaml)
        assert (conf.get("engine") or conf)["packed_weights"] == "auto", yaml


@pytest.mark.parametrize("mode", [True, False])
def test_every_stage_hands_engine_shared_prefix_to_the_hf_engine(mode):
    """engine.shared_prefix reaches the HF engine of evaluation, synthesis and curation's chat
    stages; it is on by default in both engine blocks, and a value that is not a bool is refused."""
    from domino.core.generation import chat as G
    from domino.core.generation import hf
    from domino.evaluation.generation import build_engine
    from domino.synthesis.methods import Plan
    from domino.synthesis.run import _build_engine
    ecfg = {"name": "hf", "device": "cpu", "shared_prefix": mode, "batch_size": 2}
    engines = [build_engine(TINY, ecfg, SamplingParams(), None, 0)[0],
               _build_engine({"engine": ecfg, "seed": 0}, TINY, {}, lambda tok, ident: Plan(method="prompt"))[0],
               G.build_generator(TINY, None, {"engine": ecfg}, where="curation.judge.generation").engine]
    G.release_models()
    assert all(isinstance(e, hf.HFEngine) and e.shared_prefix is mode for e in engines)
    assert "shared_prefix" in factory.HF_KEYS and "shared_prefix" in factory.RUNTIME_KEYS
    for yaml in (CONF / "engine" / "hf.yaml", CONF / "curation" / "default.yaml"):
        conf = OmegaConf.load(yaml)
        assert (conf.get("engine") or conf)["shared_prefix"] is True, yaml
    with pytest.raises(ValueError, match="engine.shared_prefix='yes': expected true or false"):
        build_engine(TINY, {**ecfg, "shared_prefix": "yes"}, SamplingParams(), None, 0)
