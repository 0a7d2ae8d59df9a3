"""The package's shape: stages do not import each other's runners or a later stage, and the
README's layout section names what is in the tree."""
from __future__ import annotations

import ast
import re

import pytest

from .conftest import ROOT

SRC = ROOT / "src" / "domino"
# pipeline order; a stage may import an earlier stage's helpers (not its runner), never a later one
ORDER = ["training", "synthesis", "curation", "finetune", "evaluation", "data_quality"]
# shared infrastructure that lives in a later stage's package: curation runs its code checks in the
# evaluation sandbox and decontaminates against the benchmark readers
SHARED = {"domino.evaluation.sandbox", "domino.evaluation.benchmarks"}


def imports_of(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("domino.")}


def stage_imports():
    for stage in ORDER:
        for path in sorted((SRC / stage).rglob("*.py")):
            yield stage, path, imports_of(path)


def test_every_stage_is_a_package_with_a_runner():
    for stage in ORDER:
        assert (SRC / stage / "__init__.py").exists() and (SRC / stage / "run.py").exists(), stage


@pytest.mark.parametrize("stage", ORDER)
def test_no_stage_imports_another_stages_runner_or_a_later_stage(stage):
    bad = []
    for s, path, mods in stage_imports():
        if s != stage:
            continue
        for m in mods:
            parts = m.split(".")
            other = parts[1]
            if other not in ORDER or other == stage:
                continue
            if "run" in parts[2:3]:
                bad.append(f"{path.relative_to(ROOT)} imports {m} (another stage's runner)")
            elif ORDER.index(other) > ORDER.index(stage) and ".".join(parts[:3]) not in SHARED:
                bad.append(f"{path.relative_to(ROOT)} imports {m} (a later stage)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The scan above is not vacuous: it parses the imports a runner import would show up as."""
    f = tmp_path / "x.py"
    f.write_text("from domino.curation.run import run_curation\nimport domino.evaluation.run\n"
                 "def g():\n    from domino.finetune.run import finetune\n")
    assert {"domino.curation.run", "domino.evaluation.run", "domino.finetune.run"} <= imports_of(f)


def layout_entries(readme: str) -> tuple[dict[str, str], str]:
    """{"training/": "its description lines", "stages.py": ...} of the README's src/domino block,
    and the conf/ lines."""
    block = readme.split("## Layout", 1)[1].split("```")[1]
    section = block.split("src/domino/", 1)[1].split("\nscripts/", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        m = re.match(r"^  (\w+(?:\.py|/))\s*(.*)", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
    return entries, block.split("conf/", 1)[1].split("src/domino/", 1)[0]


def test_readme_layout_matches_the_tree():
    entries, conf_lines = layout_entries((ROOT / "README.md").read_text())
    tree = {p.name + "/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    tree |= {p.name for p in SRC.glob("*.py") if p.name != "__init__.py"}
    mentioned = set(entries) | {f for text in entries.values() for f in re.findall(r"\b(\w+\.py)\b", text)}
    assert not sorted(tree - mentioned), f"README layout does not mention {sorted(tree - mentioned)}"
    assert not sorted(set(entries) - tree), f"README layout names {sorted(set(entries) - tree)}, not in src/domino"
    for name, text in entries.items():
        base = SRC / name if name.endswith("/") else SRC
        for f in re.findall(r"\b(\w+\.py)\b", text):
            assert (base / f).exists() or (SRC / f).exists() or (ROOT / f).exists(), \
                f"README layout: {name} names {f}, which is not in the tree"
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert not sorted(g for g in groups if g + "/" not in conf_lines), "README layout misses a conf group"


def test_engines_threads_and_devices_are_set_up_only_by_the_engine_factory():
    """One engine factory (domino.generation.factory): no other module builds a VLLMEngine, sets
    torch's threads or resolves an engine device itself."""
    bad = []
    factory, engine = SRC / "generation" / "factory.py", SRC / "generation" / "vllm.py"
    for path in sorted(set(SRC.rglob("*.py")) - {factory}):
        text = path.read_text()
        rel = path.relative_to(ROOT)
        if "set_num_threads(" in text:
            bad.append(f"{rel} sets torch threads")
        if "VLLMEngine(" in text and path != engine:
            bad.append(f"{rel} builds a VLLMEngine")
        if re.search(r"choose_device\(\s*ecfg|choose_device\(\s*gen_cfg", text):
            bad.append(f"{rel} resolves an engine's device")
    assert not bad, "\n".join(bad)
