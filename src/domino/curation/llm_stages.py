"""Per-batch processors of the stages that call a model (judge, responses, code checks with
model-written tests). Each maps a batch of records to the same records with a verdict (kept) or
a `dropped` entry; the pipeline appends them as they come, which is what makes these stages
resumable record by record."""
from __future__ import annotations

from typing import Callable

from domino.curation import judge as J
from domino.curation import responses as R
from domino.curation.code_checks import build_test_conversation, extract_code, split_tests, syntax_error
from domino.curation.text import check, drop

Generator = Callable[[list[list[dict]]], list[str]]


def _generate(gen: Generator, convs: list[list[dict]], stage: str) -> list[str]:
    outs = list(gen(convs))
    if len(outs) != len(convs):
        raise RuntimeError(f"curation {stage}: the generator returned {len(outs)} texts for {len(convs)} prompts")
    return ["" if o is None else str(o) for o in outs]


def judge_batch(records: list[dict], gen: Generator, cfg: dict) -> list[dict]:
    """mode=generate: the model writes a verdict that is parsed (unparseable = unknown);
    mode=logprob: the most likely of the five labels after `logprob_prefix` (never unknown)."""
    convs = [J.build_conversation(r["text"], cfg["criteria"], cfg["template"], cfg.get("system"))
             for r in records]
    mode = cfg.get("mode", "generate")
    if mode == "logprob":
        if not hasattr(gen, "choose"):
            raise TypeError("judge.mode=logprob needs a model generator with .choose (not an injected callable)")
        raws = list(gen.choose(convs, list(J.LABELS), cfg.get("logprob_prefix", "Score:")))
    elif mode == "generate":
        raws = _generate(gen, convs, "judge")
    else:
        raise ValueError(f"judge.mode={mode!r}: expected generate or logprob")
    out = []
    for rec, raw in zip(records, raws):
        grade = J.parse_grade(raw) if mode == "generate" else raw
        if J.keeps(grade, cfg.get("min_grade", "average"), bool(cfg.get("keep_unknown", False))):
            out.append(check({**rec, "judge_output": raw[:1000]}, "judge", grade))
        else:
            out.append(drop(rec, "judge", f"grade:{grade}", {"judge_output": raw[:1000]}))
    return out


def responses_batch(records: list[dict], gen: Generator, cfg: dict) -> list[dict]:
    convs = [R.build_conversation(r["text"], cfg["template"], cfg.get("system")) for r in records]
    out = []
    for rec, raw in zip(records, _generate(gen, convs, "responses")):
        text = raw.strip()
        rec = {**rec, "response": text}
        out.append(check(rec, "responses", "ok") if text else drop(rec, "responses", "empty_response"))
    return out


def code_batch(records: list[dict], cfg: dict, gen: Generator | None = None, sandbox=None) -> list[dict]:
    """Extract and parse the code; with run_tests, have `gen` write tests and keep the record
    only if the solution passes all of them in `sandbox`."""
    lang = cfg.get("language") or "python"
    out: list[dict | None] = [None] * len(records)
    pending = []  # (position, record) still needing tests
    for i, rec in enumerate(records):
        code = extract_code(rec.get("response"), lang)
        rec = {**rec, "code": code}
        if code is None:
            out[i] = drop(rec, "code_checks", "no_code")
            continue
        err = syntax_error(code, lang) if cfg.get("parse", True) else None
        if err:
            out[i] = drop(rec, "code_checks", "syntax_error", {"error": err})
        elif cfg.get("run_tests"):
            pending.append((i, rec))
        else:
            out[i] = check(rec, "code_checks", "parsed")
    if pending:
        if gen is None or sandbox is None:
            raise RuntimeError("code_checks.run_tests=true needs a test-writing model and the sandbox")
        convs = [build_test_conversation(r["text"], r["code"], cfg["tests_template"], cfg.get("tests_system"))
                 for _, r in pending]
        raws = _generate(gen, convs, "code_checks")
        jobs, where = [], []
        for (i, rec), raw in zip(pending, raws):
            tests = extract_code(raw, lang)
            rec = {**rec, "tests": tests}
            if not tests:
                out[i] = drop(rec, "code_checks", "no_tests", {"tests_output": raw[:1000]})
                continue
            jobs.append((rec["code"], split_tests(tests), "functional"))
            where.append((i, rec))
        for (i, rec), res in zip(where, sandbox.run_many(jobs) if jobs else []):
            if res.status == "sandbox_error":  # the harness failed, not the program: stop, resume later
                raise RuntimeError(f"curation code_checks: sandbox error on {rec['id']}: {res.detail}\n"
                                   f"{res.stderr_tail}")
            if res.passed:
                out[i] = check(rec, "code_checks", "tests_passed")
            else:
                out[i] = drop(rec, "code_checks", "tests_failed" if res.status == "failed" else f"tests_{res.status}",
                              {"passed": res.passed_tests, "total": res.total_tests, "detail": res.detail[:500]})
    return out  # type: ignore[return-value]
