"""The model stages on a real (tiny, random) backbone: chat template, batched left-padded greedy
decoding through the shared engine (domino.core.generation.hf), and the judge/responses stages driven by it;
a teacher model other than the samples' backbone; the vLLM engine choice (wired with a stand-in
engine here, for real in the gpu-marked test)."""
import importlib.util
import json
import sys
import types

import pytest
import torch
from omegaconf import OmegaConf

from domino.core.generation import chat as G
from domino.core.generation.chat import HFChatGenerator, release_models
from domino.core.records import read_jsonl
from domino.curation.run import run_curation

from ..conftest import CONF, TINY


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
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    # the labels (1-2 tokens), and options of 1 to 6 tokens: the prompt's cache is shared and the
    # shorter options are right-padded in the continuation
    for options in (list(LABELS), ["x", "a much longer option text", "no", "two words"]):
        got_all = gen.option_scores(conv, options, "Score:")
        assert max(len(tok(" " + o, add_special_tokens=False)["input_ids"]) for o in options) >= 2
        for label, got in zip(options, got_all):  # one unpadded sequence per label, full logits
            base = gen.encode(conv) + tok("Score:", add_special_tokens=False)["input_ids"]
            opt = tok(" " + label, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([base + opt], device=model.device)).logits[0]
            logp = logits.float().log_softmax(-1)
            want = sum(float(logp[len(base) - 1 + j, t]) for j, t in enumerate(opt))
            assert got == pytest.approx(want, abs=1e-4)
    scores = gen.option_scores(conv, list(LABELS), "Score:")
    assert gen.choose([conv], list(LABELS), "Score:") == [LABELS[max(range(5), key=lambda i: scores[i])]]


def _samples(tmp_path, n=2):
    recs = [{"id": f"s-{i}", "text": f"Write a function that returns the {w} of a list of integers."}
            for i, w in enumerate(("sum", "product", "maximum", "minimum")[:n])]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path / "samples.jsonl"


def _model_cfg(max_new_tokens=4):
    cfg = OmegaConf.load(CONF / "curation" / "default.yaml")
    for s in ("normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate", "code_checks"):
        cfg[s].enabled = False
    cfg.judge.keep_unknown = True
    for s in ("judge", "responses"):
        cfg[s].generation.sampling.max_new_tokens = max_new_tokens
        cfg[s].generation.batch_size = 2
    return cfg


def test_teacher_config():
    bb = {"name": "smollm2", "path": "embedded", "dtype": "float32", "cache_dir": "/c"}
    assert G.teacher_config(None, bb) == G.teacher_config({"path": None, "dtype": None}, bb) == bb
    assert G.teacher_config({"path": None, "dtype": "bfloat16"}, bb) == {**bb, "dtype": "bfloat16"}
    assert G.teacher_config({"path": "Qwen/Qwen2.5-Coder-7B-Instruct", "dtype": None}, bb) == {
        "path": "Qwen/Qwen2.5-Coder-7B-Instruct", "cache_dir": "/c"}
    assert G.teacher_config("/models/t", None) == {"path": "/models/t"}
    assert G.teacher_config(None, None) == G.DEFAULT_BACKBONE


def test_a_teacher_other_than_the_backbone_is_used(tmp_path, monkeypatch):
    """judge.model names another (tiny) model than the samples' backbone: that config is loaded and
    the judge's generator is built on it, the stage meta records it, and the responses stage (model
    unset) runs on the backbone. Switching the judge back to the backbone redoes only the judge."""
    import domino.core.backbone
    loaded, real = [], domino.core.backbone.load_backbone

    def spy(**kw):
        loaded.append(kw)
        return real(**kw)
    monkeypatch.setattr(domino.core.backbone, "load_backbone", spy)
    built, real_init = [], HFChatGenerator.__init__

    def spy_init(self, backbone, *a, **kw):
        built.append(backbone.id)
        real_init(self, backbone, *a, **kw)
    monkeypatch.setattr(HFChatGenerator, "__init__", spy_init)
    teacher = {"path": "tiny", "tiny": {**TINY["tiny"], "hidden_size": 32, "seed": 1}}
    cfg = _model_cfg()
    cfg.judge.model = teacher
    samples = _samples(tmp_path)
    try:
        run_curation(cfg, samples, tmp_path, backbone={**TINY, "cache_dir": None}, progress=False)
        judge = json.loads((tmp_path / "curation" / "06_judge.meta.json").read_text())
        responses = json.loads((tmp_path / "curation" / "07_responses.meta.json").read_text())
        assert judge["model"] == teacher and judge["engine"] == "hf"
        assert responses["model"] == {k: v for k, v in TINY.items()}
        assert [kw["tiny"]["seed"] for kw in loaded] == [1, 0]  # the teacher for the judge, then the backbone
        assert len(built) == 2 and '"seed": 1' in built[0] and '"seed": 0' in built[1]
        cfg.judge.model = {"path": None, "dtype": None}
        run_curation(cfg, samples, tmp_path, backbone={**TINY, "cache_dir": None}, progress=False)
        again = json.loads((tmp_path / "curation" / "06_judge.meta.json").read_text())
        assert again["model"] == responses["model"] and again["config_fingerprint"] != judge["config_fingerprint"]
        # the judge ran again, on the backbone; the responses stage needed no model (skipped or reused)
        assert len(built) == 3 and '"seed": 0' in built[2]
    finally:
        release_models()


def test_model_settings_left_at_their_defaults_keep_the_stage_fingerprint():
    """model {path: null}, the shared engine block (hf) and a stage engine of null fingerprint like
    the older `model: null` config whose stage block held engine hf, device auto, num_threads null and
    a vllm block: upgrading does not redo a finished judge. Device and threads never change it; the
    engine (and, on vLLM, its settings) does."""
    from domino.curation.run import _model_stage_config
    cur = OmegaConf.to_container(OmegaConf.load(CONF / "curation" / "default.yaml"))
    new, shared = cur["judge"], cur["engine"]
    older = {**new, "model": None, "generation": {**{k: v for k, v in new["generation"].items() if k != "engine"},
                                                  "device": "auto", "num_threads": None}}
    older_spelling = {**older, "generation": {**older["generation"], "engine": "hf",
                                              "vllm": {"gpu_memory_utilization": 0.9}}}
    assert _model_stage_config(new, shared) == _model_stage_config(older) == _model_stage_config(older_spelling)
    threads = {**new, "generation": {**new["generation"], "num_threads": 1}}
    assert _model_stage_config(threads, {**shared, "device": "cpu"}) == _model_stage_config(new, shared)
    vllm = {**new, "generation": {**new["generation"], "engine": "vllm"}}
    assert _model_stage_config(vllm, shared) != _model_stage_config(new, shared)
    assert _model_stage_config(new, {**shared, "name": "vllm"}) == _model_stage_config(vllm, shared)
    tighter = {**shared, "name": "vllm", "gpu_memory_utilization": 0.3}
    assert _model_stage_config(new, tighter) != _model_stage_config(vllm, shared)
    # refill and chunk (added 2026-12-04) decide which rows share a batch and how often the stage
    # file is appended to, not the verdicts: a config from before them fingerprints the same
    before = {**new, "generation": {k: v for k, v in new["generation"].items() if k != "chunk"}}
    no_refill = {k: v for k, v in shared.items() if k != "refill"}
    assert "chunk" in new["generation"] and "refill" in shared
    chunked = {**new, "generation": {**new["generation"], "chunk": 64}}
    for eng in (shared, {**shared, "name": "vllm"}):
        old_eng = {k: v for k, v in eng.items() if k != "refill"}
        assert _model_stage_config(before, old_eng) == _model_stage_config(new, eng) == \
            _model_stage_config(chunked, {**eng, "refill": False})
    assert _model_stage_config(new, no_refill) == _model_stage_config(new, shared)


def test_refill_decodes_a_call_with_continuous_batching_and_chunks_the_stage(tiny_backbone):
    """HFChatGenerator(refill=True) decodes one call's conversations `batch_size` rows at a time,
    refilling finished rows (more prefills, fewer decoding steps than fixed batches), with the
    answers fixed batches give (this fp32 tiny model; each row's seed is its content's). Curation
    hands it 4 x batch_size records per call unless `chunk` says otherwise, and batch_size records
    with refill off, on vLLM, to an injected generator or to the logprob judge."""
    from domino.curation.run import Curation
    convs = [[{"role": "user", "content": "word " * (1 + 3 * i % 7)}] for i in range(9)]
    kw = dict(sampling={"temperature": 1.0, "max_new_tokens": 12, "stop": ["a"]}, batch_size=3)
    fixed, many = HFChatGenerator(tiny_backbone, **kw), HFChatGenerator(tiny_backbone, refill=True, **kw)
    got = many(convs)
    assert got == fixed(convs) and len({len(t) for t in got}) > 1
    assert many.engine.n_prefill > fixed.engine.n_prefill == 3  # rows joined running batches
    assert many.engine.n_forward - many.engine.n_prefill < fixed.engine.n_forward - fixed.engine.n_prefill
    assert many([]) == []
    cur = Curation.__new__(Curation)
    cur.cfg, cur.generators = {"engine": {"name": "hf", "refill": True}}, None
    assert cur._chunk({"generation": {"batch_size": 8}}, "responses") == 32
    assert cur._chunk({"generation": {"batch_size": 8, "chunk": 5}}, "responses") == 5
    assert cur._chunk({"tests_generation": {"batch_size": 3}}, "tests", "tests_generation") == 12
    assert cur._chunk({"mode": "logprob", "generation": {"batch_size": 8}}, "judge") == 8  # decodes nothing
    assert cur._chunk({"mode": "generate", "generation": {"batch_size": 8}}, "judge") == 32
    cur.generators = {"judge": len}  # an injected generator is called with batch_size records
    assert cur._chunk({"generation": {"batch_size": 8}}, "judge") == 8
    assert cur._chunk({"generation": {"batch_size": 8}}, "responses") == 32
    cur.generators = None
    cur.cfg = {"engine": {"name": "hf", "refill": False}}
    assert cur._chunk({"generation": {"batch_size": 8}}, "responses") == 8
    cur.cfg = {"engine": {"name": "vllm", "refill": True}}
    assert cur._chunk({"generation": {"batch_size": 256}}, "responses") == 256


def test_stage_engine_reads_the_shared_block_and_the_older_spellings():
    from domino.core.generation.chat import stage_engine
    shared = {"name": "hf", "device": "auto", "num_threads": None, "gpu_memory_utilization": 0.9}
    assert stage_engine({"engine": None}, shared) == {"name": "hf", "device": "auto", "gpu_memory_utilization": 0.9}
    assert stage_engine({"engine": "hf", "num_threads": 1, "device": "cpu"}, shared)["num_threads"] == 1
    v = stage_engine({"engine": "vllm", "vllm": {"gpu_memory_utilization": 0.3}}, shared)
    assert v["name"] == "vllm" and v["gpu_memory_utilization"] == 0.3
    assert stage_engine({"engine": {"name": "vllm", "gpu_memory_utilization": 0.5},
                         "vllm": {"gpu_memory_utilization": 0.3}}, shared)["gpu_memory_utilization"] == 0.5
    assert stage_engine({}, None) == {"name": "hf"}
    with pytest.raises(ValueError, match=r"curation\.judge\.generation\.engine='tgi'"):
        stage_engine({"engine": "tgi"}, shared, "curation.judge.generation")


def test_vllm_choice_errors_are_clear(tmp_path, monkeypatch):
    from domino.curation.run import run_curation as run
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed, wherever this runs
    cfg = _model_cfg()
    samples = _samples(tmp_path)
    cfg.responses.generation.engine = "vllm"
    with pytest.raises(ImportError, match=r"curation\.responses\.generation\.engine=vllm needs vLLM"):
        run(cfg, samples, tmp_path, backbone=TINY, progress=False)
    assert not (tmp_path / "curation").exists()  # refused before any stage ran
    cfg.responses.generation.engine = "hf"
    cfg.judge.mode = "logprob"
    cfg.judge.generation.engine = "vllm"
    with pytest.raises(ValueError, match=r"curation\.judge\.mode=logprob .* curation\.judge\.generation\.engine=hf"):
        run(cfg, samples, tmp_path, backbone=TINY, progress=False)
    cfg.judge.generation.engine = "tgi"
    with pytest.raises(ValueError, match=r"curation\.judge\.generation\.engine='tgi'"):
        run(cfg, samples, tmp_path, backbone=TINY, progress=False)
    cfg.code_checks.enabled, cfg.code_checks.run_tests = True, True
    cfg.code_checks.tests_generation.engine = "vllm"
    cfg.judge.generation.engine, cfg.judge.mode = "hf", "generate"
    with pytest.raises(ImportError, match=r"curation\.code_checks\.tests_generation\.engine=vllm"):
        run(cfg, samples, tmp_path, backbone=TINY, progress=False)
    from domino.core.backbone import model_dir
    with pytest.raises(ValueError, match="tiny test backbone"):
        model_dir(TINY)  # the one path rule every vLLM factory uses


class StandInEngine:
    """What VLLMEngine offers the chat generator: generate_prompts(token-id prompts, seeds)."""

    def __init__(self, params):
        self.params, self.calls = params, []

    def generate_prompts(self, prompts, seeds):
        from domino.core.generation.params import Generation
        self.calls.append((self.params, prompts, seeds))
        return [Generation([], "Fine.\nScore: good", "stop") for _ in prompts]


@pytest.fixture()
def tiny_dir(tmp_path_factory, tiny_backbone):
    d = tmp_path_factory.mktemp("tiny_teacher")
    tiny_backbone.model.save_pretrained(d)
    tiny_backbone.tokenizer.save_pretrained(d)
    return d


def test_vllm_chat_generator_sends_chat_token_ids_and_row_seeds(tmp_path, monkeypatch, tiny_backbone, tiny_dir):
    """engine=vllm without vLLM: a stand-in for the engine shows what reaches it. The prompts are
    the chat-template token ids and the seeds the per-row seeds the HF generator uses; the judge
    stage records the engine, and its fingerprint differs from the same judge on HF."""
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    engines = []

    def fake_engine(model_dir, trust, vcfg, params, seed):
        assert model_dir == str(tiny_dir) and vcfg["gpu_memory_utilization"] == 0.9
        engines.append(StandInEngine(params))
        return engines[-1]
    monkeypatch.setattr(G, "_vllm_engine", fake_engine)
    gen_cfg = {"engine": "vllm", "batch_size": 2, "seed": 3, "sampling": {"max_new_tokens": 5},
               "vllm": {"gpu_memory_utilization": 0.9}}
    gen = G.build_generator({"path": str(tiny_dir)}, TINY, gen_cfg, "curation.judge.generation")
    hf = HFChatGenerator(tiny_backbone, sampling={"max_new_tokens": 5}, seed=3)
    convs = [[{"role": "user", "content": t}] for t in ("a", "bb", "ccc")]
    assert isinstance(gen, G.VLLMChatGenerator) and gen(convs) == ["Fine.\nScore: good"] * 3
    calls = engines[0].calls
    assert [len(p) for _, p, _ in calls] == [2, 1]  # batch_size rows per call
    assert [x for _, p, _ in calls for x in p] == [hf.encode(c) for c in convs]
    assert [x for _, _, s in calls for x in s] == [hf.row_seed(c) for c in convs]
    assert calls[0][0].max_new_tokens == 5 and calls[0][0].temperature == 0.0
    assert gen.fingerprint != hf.fingerprint
    # the stage on it
    cfg = _model_cfg()
    cfg.responses.enabled = False
    cfg.judge.model.path = str(tiny_dir)
    cfg.judge.generation.engine = "vllm"
    cfg.judge.generation.batch_size = 1
    run_curation(cfg, _samples(tmp_path), tmp_path, backbone=TINY, progress=False)
    meta = json.loads((tmp_path / "curation" / "06_judge.meta.json").read_text())
    assert meta["engine"] == "vllm" and meta["model"]["path"] == str(tiny_dir) and meta["grades"]["good"] == 2
    assert len(engines) == 2  # one generator for the stage, not one per batch


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_judge_and_responses_on_vllm(tmp_path, tiny_dir):
    """The judge and responses stages on vLLM (a saved tiny model as the teacher): every record gets
    a verdict and a response, and a second generator reproduces the outputs across batch sizes."""
    cfg = _model_cfg(max_new_tokens=8)
    for s in ("judge", "responses"):
        cfg[s].model.path = str(tiny_dir)
        cfg[s].generation.engine = {"name": "vllm", "gpu_memory_utilization": 0.3, "enforce_eager": True}
    try:
        run_curation(cfg, _samples(tmp_path, 4), tmp_path, backbone=TINY, progress=False)
        cur = tmp_path / "curation"
        assert json.loads((cur / "06_judge.meta.json").read_text())["engine"] == "vllm"
        responses = read_jsonl(cur / "07_responses.jsonl") + read_jsonl(cur / "07_responses.dropped.jsonl")
        assert sorted(r["id"] for r in responses) == ["s-0", "s-1", "s-2", "s-3"]
        gen_cfg = OmegaConf.to_container(cfg.responses.generation)  # its engine block: vllm
        convs = [[{"role": "user", "content": f"Problem {i}"}] for i in range(5)]
        a = G.build_generator({"path": str(tiny_dir)}, TINY, {**gen_cfg, "batch_size": 5}, "g")(convs)
        b = G.build_generator({"path": str(tiny_dir)}, TINY, {**gen_cfg, "batch_size": 2}, "g")(convs)
        assert a == b and all(isinstance(t, str) for t in a)
    finally:
        release_models()
