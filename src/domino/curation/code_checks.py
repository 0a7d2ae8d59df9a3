"""Stage 8: the response's code must parse; optionally the model writes tests for it and the
solution must pass them in the evaluation sandbox (a fresh interpreter per program, see
domino.core.sandbox). Only python is parsed; other languages skip the parse check."""
from __future__ import annotations

import ast

from domino.core.generation.chat import messages
from domino.core.generation.code import extract_code


def syntax_error(code: str, language: str = "python") -> str | None:
    """None when `code` parses (or is not python); else the error, with its line."""
    if language.lower() not in ("python", "py"):
        return None
    try:
        ast.parse(code)
    except SyntaxError as e:
        return f"{e.msg} (line {e.lineno})"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        return f"{type(e).__name__}: {e}"
    return None


def build_test_conversation(problem: str, code: str, template: str, system: str | None = None) -> list[dict]:
    return messages(template.format(text=problem, code=code), system)


def split_tests(test_code: str) -> list[str]:
    """One sandbox test per top-level `assert`; every other top-level statement (imports,
    helpers) is setup repeated before each, so one failing assert does not hide the others.
    Code that does not parse is returned whole (it then fails in the sandbox, as it should)."""
    try:
        tree = ast.parse(test_code)
    except SyntaxError:
        return [test_code]
    setup = [ast.get_source_segment(test_code, n) or "" for n in tree.body if not isinstance(n, ast.Assert)]
    asserts = [ast.get_source_segment(test_code, n) or "" for n in tree.body if isinstance(n, ast.Assert)]
    if not asserts:
        return [test_code]  # e.g. tests inside a function that is then called: run as one
    prefix = "\n".join(s for s in setup if s)
    return [(prefix + "\n" + a) if prefix else a for a in asserts]


def make_sandbox(cfg: dict):
    """The evaluation stage's sandbox with the `sandbox` settings of the code-check config."""
    try:
        from domino.core.sandbox import Sandbox, SandboxConfig
    except ImportError as e:  # pragma: no cover - the module ships with the package
        raise RuntimeError("code_checks.run_tests=true needs domino.core.sandbox") from e
    return Sandbox(SandboxConfig(**{k: v for k, v in (cfg or {}).items() if v is not None}))


__all__ = ["syntax_error", "extract_code", "build_test_conversation", "split_tests", "make_sandbox"]
