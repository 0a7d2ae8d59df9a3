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

import pytest  # noqa: F401 (slow marker below)

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
    assert adapter_fingerprint(tmp_path / "a") == adapter_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert adapter_fingerprint(tmp_path / "a") != adapter_fingerprint(tmp_path / "b")


# ------------------------------------------------------------------------------ sandbox
def test_identical_jobs_run_once_and_are_flagged_deterministically():
    """Copies of a program in one run_many used to race for the cache (both executing, or the
    later one hitting the result of the first, by thread timing): now the first executes, the
    copies are `cached`, whatever the timing."""
    from domino.evaluation.sandbox import Sandbox, SandboxConfig
    tests = ["assert add(1, 2) == 3"]
    jobs = [(f"def add(a, b):\n    return a + b + {i % 2}\n", tests, "functional") for i in range(6)]
    for _ in range(2):
        res = Sandbox(SandboxConfig(workers=2, timeout_per_test=2.0, isolation="process")).run_many(jobs)
        assert [r.status for r in res] == ["passed", "failed"] * 3
        assert [r.cached for r in res] == [False, False, True, True, True, True]


def test_default_execution_cache_is_per_run(compose):
    cfg = compose("evaluate", [], output_dir="/some/run")
    assert cfg.cache_path == "/some/run/exec_cache.jsonl"
