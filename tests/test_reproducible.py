"""Run-to-run reproducibility: the same command twice gives the same outputs, whatever the
process's string-hash seed (PYTHONHASHSEED differs per process unless set, and it decides the
iteration order of sets and of dicts filled from them).

Each check runs the same code in separate processes with different PYTHONHASHSEED values and
compares what they print or write."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT

HASH_SEEDS = ("0", "1", "2", "3", "4", "5")


def run_with_hash_seeds(code: str, seeds=HASH_SEEDS, timeout=120) -> list[str]:
    """stdout of `code` run in a fresh interpreter once per PYTHONHASHSEED."""
    outs = []
    for s in seeds:
        env = {**os.environ, "PYTHONHASHSEED": s, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(proc.stdout)
    return outs


# ------------------------------------------------------------------------------ memorisation
# A 17-word sample; seven references share two of its 8-grams each (a tie on n-gram hits), but only
# ref-0 shares a 9-word run (LCS ratio 9/17 >= 0.5: a near-copy). With lcs_candidates=5 the LCS is
# computed for five of the seven tied references; which five used to follow the iteration order of
# a set of string tuples, i.e. the process's hash seed.
MEMORISATION = """
import json
from domino.curation.overlap import memorisation_filter
w = [f"w{i}" for i in range(17)]
sample = {"id": "s", "text": " ".join(w)}
refs = [{"id": "ref-0", "text": " ".join(["x0"] + w[0:9] + ["x1"])}]
for k in range(1, 7):
    refs.append({"id": f"ref-{k}", "text": " ".join([f"a{k}"] + w[0:8] + [f"b{k}"] + w[9:17] + [f"c{k}"])})
kept, dropped = memorisation_filter([sample], refs, n=8, lcs_candidates=5)
print(json.dumps([kept, dropped], sort_keys=True))
"""


def test_memorisation_verdict_does_not_depend_on_the_hash_seed():
    outs = run_with_hash_seeds(MEMORISATION)
    assert len(set(outs)) == 1, "memorisation verdicts differ between processes:\n" + "\n".join(outs)
    kept, dropped = json.loads(outs[0])
    # ties on n-gram hits go to the reference listed first, so ref-0 is among the LCS candidates
    assert kept == [] and dropped[0]["dropped"]["reason"] == "longest_common_substring"
    assert dropped[0]["dropped"]["detail"]["lcs_ref"] == "ref-0"


# ------------------------------------------------------------------------------ adapter identity
def test_adapter_fingerprint_is_the_weights_not_the_provenance(tmp_path):
    """evaluate.py's completion keys (gen_key, used to resume) hash the adapter. Two runs that
    export the same weights from different run directories (or at another git commit) must get
    the same key: the provenance file beside the weights names paths, not what is computed."""
    from domino.evaluation.generation import adapter_fingerprint
    for d, where in (("a", "/runs/a"), ("b", "/elsewhere/b")):
        (tmp_path / d).mkdir()
        (tmp_path / d / "adapter_config.json").write_text('{"r": 4}')
        (tmp_path / d / "adapter_model.safetensors").write_bytes(b"weights")
        (tmp_path / d / "domino_finetune.json").write_text(json.dumps({"data": {"path": where}}))
        (tmp_path / d / "lineage.json").write_text(json.dumps({"adapter": where, "sft": where + "/sft.jsonl"}))
    assert adapter_fingerprint(tmp_path / "a") == adapter_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert adapter_fingerprint(tmp_path / "a") != adapter_fingerprint(tmp_path / "b")


def test_adapter_config_does_not_depend_on_the_hash_seed(tmp_path):
    """peft holds target_modules as a set and saves it in set order (the hash seed's): the same
    adapter's adapter_config.json differed run to run. finetune.py rewrites it sorted, and the
    fingerprint ignores the order of an adapter written without that."""
    from domino.evaluation.generation import adapter_fingerprint
    from domino.finetune.run import canonical_adapter_config
    code = f"""
        from peft import LoraConfig
        LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]).save_pretrained({str(tmp_path)!r})
        print(open({str(tmp_path / "adapter_config.json")!r}).read())
    """
    raw = run_with_hash_seeds(code, seeds=("1", "2", "3"))
    orders = {tuple(json.loads(r)["target_modules"]) for r in raw}
    assert len(orders) > 1  # peft's own file: the order follows the hash seed
    fps = set()
    for i, r in enumerate(raw):
        d = tmp_path / f"a{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text(r)
        (d / "adapter_model.safetensors").write_bytes(b"w")
        fps.add(adapter_fingerprint(d))
        canonical_adapter_config(d)
        assert json.loads((d / "adapter_config.json").read_text())["target_modules"] == [
            "k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(fps) == 1
    assert len({(tmp_path / f"a{i}" / "adapter_config.json").read_text() for i in range(len(raw))}) == 1


# ------------------------------------------------------------------------------ sandbox
def test_identical_jobs_run_once_and_are_flagged_deterministically():
    """Copies of a program in one run_many used to race for the cache (both executing, or the
    later one hitting the result of the first, by thread timing): now the first executes, the
    copies are `cached`, whatever the timing."""
    from domino.core.sandbox import Sandbox, SandboxConfig
    tests = ["assert add(1, 2) == 3"]
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", tests, "functional") for i in range(6)]
    for _ in range(2):
        res = Sandbox(SandboxConfig(workers=2, timeout_per_test=2.0, isolation="process")).run_many(jobs)
        assert [r.status for r in res] == ["passed", "failed"] * 3
        assert [r.cached for r in res] == [False, False, True, True, True, True]


def test_a_program_iterating_a_set_of_strings_gets_the_same_verdict_every_run():
    """The sandboxed interpreter used to start with a random string-hash seed (`python -I`
    ignores PYTHONHASHSEED), so a completion whose answer follows a set's order (`list(set(words))`)
    passed or failed at random, run to run. Programs now run with a fixed hash seed."""
    from domino.core.sandbox import Sandbox, SandboxConfig
    words = [f"w{i}" for i in range(12)]
    program = f"def f():\n    return list(set({words!r}))\n"
    tests = ["got = f()\nassert got[0] < got[1], got"]  # passes for about half the orders
    verdicts = set()
    for i in range(6):  # a fresh sandbox (and a different comment) each time: nothing cached
        sb = Sandbox(SandboxConfig(workers=1, timeout_per_test=5.0, isolation="process"))
        r = sb.run(program + f"# run {i}\n", tests)
        verdicts.add((r.status, r.detail))
    assert len(verdicts) == 1, verdicts


def test_a_program_drawing_unseeded_random_numbers_gets_the_same_verdict_every_run():
    """`random` in the sandbox starts from a fixed seed, as the string hash does."""
    from domino.core.sandbox import Sandbox, SandboxConfig
    program = "import random\ndef f():\n    return [random.random() for _ in range(3)]\n"
    tests = ["got = f()\nassert got[0] < 0.5, got"]
    verdicts = set()
    for i in range(6):
        sb = Sandbox(SandboxConfig(workers=1, timeout_per_test=5.0, isolation="process"))
        r = sb.run(program + f"# run {i}\n", tests)
        verdicts.add((r.status, r.detail))
    assert len(verdicts) == 1, verdicts


def test_default_execution_cache_is_per_run(compose):
    cfg = compose("evaluate", [], output_dir="/some/run")
    assert cfg.cache_path == "/some/run/exec_cache.jsonl"


# ------------------------------------------------------------------------------ the whole demo
def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _demo_outputs(d):
    """What `make demo` produces, less what names its directory or the clock."""
    from safetensors.torch import load_file
    samples = [{k: r[k] for k in ("id", "text", "finish_reason", "n_tokens")} | {"seed": r["source"]["seed"]}
               for r in _jsonl(d / "synthesize" / "samples.jsonl")]
    curated = [{k: v for k, v in r.items() if k != "source"} for r in _jsonl(d / "synthesize" / "curated.jsonl")]
    out = {"samples": samples, "curated": curated, "sft": (d / "synthesize" / "sft.jsonl").read_text(),
           "adapter": load_file(str(d / "finetune" / "adapter" / "adapter_model.safetensors")),
           "adapter_config": json.loads((d / "finetune" / "adapter" / "adapter_config.json").read_text())}
    if (d / "sample_soft_prompt" / "samples.jsonl").exists():  # the demo's DOMINO vs soft prompt comparison
        out["soft_prompt_samples"] = [(r["id"], r["text"]) for r in _jsonl(d / "sample_soft_prompt" / "samples.jsonl")]
        out["data_quality_rows"] = json.loads((d / "compare" / "data_quality.json").read_text())["rows"]
    for ev in ("eval_base", "eval_finetuned"):
        out[ev] = {
            "completions": sorted(((r["task_id"], r["sample_idx"], r["gen_key"], r["output"], r["program"])
                                  for r in _jsonl(d / ev / "completions.jsonl"))),
            "results": [{**r, "samples": [{k: s[k] for k in ("sample_idx", "status", "passed_tests", "total_tests",
                                                             "detail", "cached")} for s in r["samples"]]}
                        for r in _jsonl(d / ev / "results.jsonl")],
            "summary": {k: v for k, v in json.loads((d / ev / "summary.json").read_text()).items()
                        if k.startswith("pass@") or k in ("tasks", "samples", "outcomes", "adapter_fingerprint")}}
    return out


@pytest.mark.slow
def test_demo_twice_with_different_hash_seeds_gives_identical_outputs(tmp_path):
    """scripts/demo.sh on the tiny backbone (tests/test_pipeline.py's settings), twice, in fresh
    directories, with different PYTHONHASHSEED: samples, curated and SFT records, the adapter's
    tensors, and both evaluations (completions, per-sample verdicts, pass@k) are identical."""
    import torch

    from .test_pipeline import TINY_STAGES
    outs = []
    for name, hash_seed in (("a", "11"), ("b", "22")):
        env = {**os.environ, **TINY_STAGES, "DEMO_DIR": str(tmp_path / name), "OMP_NUM_THREADS": "1",
               "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        outs.append(_demo_outputs(tmp_path / name))
    a, b = outs
    assert a["samples"] and a["samples"] == b["samples"]
    assert a["curated"] == b["curated"] and a["sft"] and a["sft"] == b["sft"]
    assert a["adapter_config"] == b["adapter_config"]
    assert sorted(a["adapter"]) == sorted(b["adapter"]) and a["adapter"]
    for k in a["adapter"]:
        assert torch.equal(a["adapter"][k], b["adapter"][k]), k
    for ev in ("eval_base", "eval_finetuned"):
        assert a[ev]["completions"] == b[ev]["completions"], ev
        assert a[ev]["results"] == b[ev]["results"], ev
        assert a[ev]["summary"] == b[ev]["summary"] and "pass@1" in a[ev]["summary"], ev
    assert a.get("soft_prompt_samples") == b.get("soft_prompt_samples")
    assert a.get("data_quality_rows") == b.get("data_quality_rows")
    # each run executed its own programs: nothing came from the other run's cache
    assert not any(s["cached"] for ev in ("eval_base", "eval_finetuned")
                   for r in b[ev]["results"] for s in r["samples"])


# ------------------------------------------------------------------------------ curation, every stage
# The tiny demo switches the judge and the code checks off; here every curation stage runs on fixed
# samples (the curation fixtures plus the tie case above), in two processes with different hash
# seeds: (1) the tiny model as logprob judge (as the demo's judge) and as sampled responder, (2) the
# deterministic fake model of test_curation_pipeline writing responses and tests, which run in the
# sandbox. Every stage file and the SFT records must be identical.
CURATION = """
import json, shutil, sys
from pathlib import Path
from omegaconf import OmegaConf
from domino.core.generation.chat import release_models
from domino.curation.run import run_curation
from tests.conftest import CONF, FIXTURES, TINY
from tests.curation.test_curation_pipeline import HELDOUT, FakeModel

out = Path(sys.argv[1])
w = [f"w{i}" for i in range(17)]
extra = [{"id": "tie", "text": " ".join(w)}]
refs = [json.loads(x) for x in (FIXTURES / "curation_references.jsonl").read_text().splitlines()]
refs += [{"id": "tie-ref-0", "text": " ".join(["x0"] + w[0:9] + ["x1"])}]
refs += [{"id": f"tie-ref-{k}", "text": " ".join([f"a{k}"] + w[0:8] + [f"b{k}"] + w[9:17] + [f"c{k}"])}
         for k in range(1, 7)]
for variant in ("tiny", "fake"):
    d = out / variant
    d.mkdir(parents=True)
    shutil.copy(FIXTURES / "curation_samples.jsonl", d / "samples.jsonl")
    with open(d / "samples.jsonl", "a") as fh:
        fh.write("".join(json.dumps(r) + "\\n" for r in extra))
    cfg = OmegaConf.load(CONF / "curation" / "default.yaml")
    cfg.memorisation.lcs_candidates = 5
    if variant == "tiny":
        cfg.judge.mode = "logprob"
        cfg.judge.min_grade = "very poor"  # keep every record: the responses stage sees them all
        cfg.responses.generation.sampling = {"temperature": 1.0, "max_new_tokens": 12, "min_new_tokens": 4}
        cfg.responses.generation.batch_size = 3
        kw = {"backbone": {**TINY, "cache_dir": None}}
    else:
        cfg.code_checks.run_tests = True
        cfg.code_checks.sandbox.isolation = "process"
        kw = {"generators": FakeModel()}
    run_curation(cfg, d / "samples.jsonl", d, references=refs, eval_sets=[HELDOUT], progress=False, **kw)
    release_models()
"""


def _curation_files(d):
    files = sorted(p for p in d.rglob("*.jsonl") if p.name != "samples.jsonl")
    return {str(p.relative_to(d)): p.read_text() for p in files}


@pytest.mark.slow
def test_every_curation_stage_is_identical_under_different_hash_seeds(tmp_path):
    outs = []
    for s in ("3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": s, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CURATION), str(tmp_path / s)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(_curation_files(tmp_path / s))
    a, b = outs
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], name
    # every stage ran and decided something in at least one variant
    for stage in ("03_near_dup", "04_memorisation", "05_decontaminate", "06_judge", "07_responses",
                  "08_code_checks"):
        assert any(a[f"{v}/curation/{stage}.jsonl"] or a[f"{v}/curation/{stage}.dropped.jsonl"]
                   for v in ("tiny", "fake")), stage
    assert a["fake/sft.jsonl"] and a["tiny/curation/07_responses.jsonl"]
    assert '"tie"' in a["tiny/curation/04_memorisation.dropped.jsonl"]
