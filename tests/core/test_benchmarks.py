"""Benchmark readers normalise every format; reference solutions pass, empty ones do not."""
import json
from pathlib import Path

import pytest

from domino.core.benchmarks import BenchmarkFormatError, benchmark_fingerprint, load_benchmark
from domino.core.sandbox import Sandbox, SandboxConfig
from domino.evaluation.prompting import build_prompt, code_or_answer, program_from_sample, to_program

FX = Path(__file__).parents[1] / "fixtures"
LCB_FUNC = "class Solution:\n    def total(self, nums):\n        return sum(nums)\n"
LCB_STDIN = "n = int(input())\nprint(max(map(int, input().split())))\n"


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(workers=2, timeout_per_test=3.0))


def test_humaneval_all_164_records():
    probs = load_benchmark("humaneval")
    assert len(probs) == 164 and len({p["task_id"] for p in probs}) == 164
    p = probs[0]
    assert p["test_type"] == "functional" and p["completion_style"] and p["tests"][0].endswith(
        f"check({p['entry_point']})\n")
    assert benchmark_fingerprint(probs) == benchmark_fingerprint(load_benchmark("humaneval"))
    assert benchmark_fingerprint(probs) != benchmark_fingerprint(probs[:-1])


def test_heldout_file_is_humaneval_format(sandbox):
    probs = load_benchmark("humaneval", path=str(FX / "bench_heldout.jsonl"))
    assert [p["task_id"] for p in probs] == ["HumanEval/0", "HumanEval/2", "HumanEval/53"]
    res = sandbox.run_many([(p["prompt"] + p["canonical_solution"], p["tests"], "functional") for p in probs])
    assert [r.status for r in res] == ["passed"] * 3


def test_livecodebench_both_test_types(sandbox):
    lcb = load_benchmark("livecodebench", path=str(FX / "bench_livecodebench.jsonl"))
    probs = {p["task_id"]: p for p in lcb}
    f, s = probs["lcb-func-1"], probs["lcb-stdin-1"]
    assert f["test_type"] == "functional" and len(f["tests"]) == 3 and f["entry_point"] == "total"
    assert s["test_type"] == "stdin" and len(s["tests"]) == 2  # public + decoded private
    assert sandbox.run(LCB_FUNC, f["tests"], "functional").passed
    assert sandbox.run(LCB_STDIN, s["tests"], "stdin").passed
    wrong = "class Solution:\n    def total(self, nums):\n        return sum(nums) + 1\n"
    assert sandbox.run(wrong, f["tests"], "functional").status == "failed"
    # a result object that claims equality with everything is not a correct answer
    cheat = ("class Any:\n    def __eq__(self, o):\n        return True\n"
             "class Solution:\n    def total(self, nums):\n        return Any()\n")
    assert not sandbox.run(cheat, f["tests"], "functional").passed
    # floats/ints returned as a tuple are normalised like LCB does
    tup = "class Solution:\n    def total(self, nums):\n        return sum(nums) * 1.0\n"
    assert sandbox.run(tup, f["tests"], "functional").passed


@pytest.mark.parametrize("name", ["bench_codecontests.jsonl", "bench_codecontests.parquet"])
def test_codecontests(sandbox, name):
    (p,) = load_benchmark("codecontests", path=str(FX / name))
    assert p["test_type"] == "stdin" and len(p["tests"]) == 3
    assert len(load_benchmark("codecontests", path=str(FX / name), include_generated=False)[0]["tests"]) == 2
    assert sandbox.run("a, b = map(int, input().split())\nprint(a + b)\n", p["tests"], "stdin").passed
    assert not sandbox.run("", p["tests"], "stdin").passed


def test_mbpp(sandbox):
    (p,) = load_benchmark("mbpp", path=str(FX / "bench_mbpp.jsonl"))
    assert p["task_id"] == "mbpp/11" and p["entry_point"] == "remove_Occ" and len(p["tests"]) == 3
    assert sandbox.run(p["canonical_solution"], p["tests"], "functional").passed
    assert not sandbox.run("", p["tests"], "functional").passed


def test_malformed_input_names_file_and_line(tmp_path):
    with pytest.raises(BenchmarkFormatError, match=r"bench_mbpp_malformed.jsonl:2: missing field"):
        load_benchmark("mbpp", path=str(FX / "bench_mbpp_malformed.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "a", "prompt": "x", "test": "t", "entry_point": "f"}) + "\n[1]\n")
    with pytest.raises(BenchmarkFormatError, match=r"bad.jsonl:2: expected a JSON object"):
        load_benchmark("humaneval", path=str(bad))
    bad.write_text('{"task_id": "a"\n')
    with pytest.raises(BenchmarkFormatError,
                       match=r"bad.jsonl:1: malformed JSON \(Expecting ',' delimiter at column 16\)"):
        load_benchmark("humaneval", path=str(bad))
    with pytest.raises(ValueError, match="needs benchmark.path"):
        load_benchmark("livecodebench")
    with pytest.raises(FileNotFoundError):
        load_benchmark("mbpp", path=str(tmp_path / "missing.jsonl"))


def test_code_extraction_and_program_assembly():
    (p,) = [q for q in load_benchmark("humaneval", limit=3) if q["task_id"] == "HumanEval/2"]
    answer = "Sure!\n```python\nprint('example')\n```\nFinal:\n```python\ndef truncate_number(number):\n" \
             "    return number % 1.0\n```\nDone."
    prog = to_program(p, answer, chat=True)
    assert prog.startswith(p["prompt"]) and prog.rstrip().endswith("return number % 1.0")
    assert code_or_answer("```py\nx = 1\n") == "x = 1\n"  # unterminated last block
    base = to_program(p, "    return number % 1.0\n\ndef unrelated():\n    pass\n", chat=False)
    assert base == p["prompt"] + "    return number % 1.0\n"  # cut at the Codex stop sequence
    assert program_from_sample(p, {"completion": "    return 0"}, "x:1") == p["prompt"] + "    return 0"
    assert program_from_sample(p, {"solution": "pass"}, "x:1") == "pass"
    with pytest.raises(ValueError, match="x:7"):
        program_from_sample(p, {"foo": 1}, "x:7")


def test_prompts_chat_and_base():
    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "<user>" + messages[0]["content"] + "<assistant>"

    class BaseTok:
        chat_template = None

    (p,) = load_benchmark("humaneval", limit=1)
    assert build_prompt(p, BaseTok()) == p["prompt"]
    chat = build_prompt(p, Tok(), style="domino")
    assert chat.startswith("<user>Complete the following") and p["prompt"].rstrip() in chat
    # EvalPlus' prompt (the default): its instruction, the problem in a bare fence, and the answer
    # opened with its response prefix and a ```python fence
    ep = build_prompt(p, Tok())
    assert ep.startswith("<user>Please provide a self-contained Python script") and p["prompt"].strip() in ep
    assert ep.endswith("<assistant>Below is a Python script with a self-contained function that solves the problem "
                       "and passes corresponding tests:\n```python\n")
    # the answer is the code up to its closing fence, sanitised to the entry point
    out = "def " + p["entry_point"] + "(x):\n    return 1\n\nprint(" + p["entry_point"] + "(2))\n```\nmore text"
    prog = to_program(p, out, chat=True, style="evalplus")
    assert prog.startswith(p["prompt"]) and "print(" not in prog and "more text" not in prog
    with pytest.raises(ValueError, match="prompt.style"):
        build_prompt(p, Tok(), style="fancy")
    (s,) = [q for q in load_benchmark("livecodebench", path=str(FX / "bench_livecodebench.jsonl"))
            if q["test_type"] == "stdin"]
    base = build_prompt(s, BaseTok())
    assert base.endswith("```python\n") and "standard input" in base
