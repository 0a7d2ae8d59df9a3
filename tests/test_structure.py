"""The package's shape: a library (domino.core) that imports no stage; stage packages that import
the library, their own package and helpers of earlier stages, never another stage's runner or a
later stage; one stage table that the CLI, the API and the entry scripts read; the README's layout
section names what is in the tree."""
from __future__ import annotations

import ast
import re

import pytest

from .conftest import ROOT

SRC = ROOT / "src" / "domino"
# pipeline order; a stage may import an earlier stage's helpers (not its runner), never a later one
ORDER = ["training", "synthesis", "curation", "finetune", "evaluation", "data_quality", "study"]


def imports_of(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in out if m == "domino" or m.startswith("domino.")}


def import_problems(path, package: str) -> list[str]:
    """What `path` (a module of `package`: "core", a stage, or "" for the top level) may not import."""
    bad = []
    for m in sorted(imports_of(path)):
        parts = m.split(".")
        if len(parts) < 2 or parts[1] == "core" or parts[1] == package:
            continue  # the root package (it registers the resolvers), the library, itself
        where = f"{path.relative_to(ROOT)} imports {m}"
        if package == "core":
            bad.append(f"{where}: the library imports no stage and not the stage table")
        elif parts[1] in ORDER:
            if parts[2:3] == ["run"] and package:
                bad.append(f"{where}: another stage's runner (go through domino.stages)")
            elif package in ORDER and ORDER.index(parts[1]) > ORDER.index(package):
                bad.append(f"{where}: a later stage")
        elif parts[1] in ("api", "cli") and package:
            bad.append(f"{where}: a stage imports the front ends")
        elif parts[1] == "stages" and package not in ("study", ""):
            bad.append(f"{where}: only the study runs other stages (through the table)")
    return bad


def package_modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).parts
        yield (rel[0] if len(rel) > 1 else ""), path


def test_the_library_and_every_stage_are_packages():
    assert (SRC / "core" / "__init__.py").exists()
    for stage in ORDER:
        assert (SRC / stage / "__init__.py").exists() and (SRC / stage / "run.py").exists(), stage
    top = {p.name for p in SRC.glob("*.py")}
    assert top == {"__init__.py", "api.py", "cli.py", "stages.py"}, f"top-level modules: {sorted(top)}"
    assert {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {"core", *ORDER}


@pytest.mark.parametrize("package", ["core", "", *ORDER])
def test_imports_follow_the_layers(package):
    """No allow-list: the library imports nothing above it; a stage imports the library, itself and
    earlier stages' helpers; only the stage table (domino.stages) imports runners."""
    bad = [p for pkg, path in package_modules() if pkg == package for p in import_problems(path, package)]
    if package == "":
        bad += [f"{path.relative_to(ROOT)} imports {m}" for pkg, path in package_modules()
                if path.name != "stages.py" and pkg == "" for m in imports_of(path) if m.endswith(".run")
                or ".run." in m]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The rules above are not vacuous: each kind of import they refuse is refused."""
    core, stage = tmp_path / "core.py", tmp_path / "stage.py"
    core.write_text("from domino.training.module import DominoModule\nimport domino.stages\n"
                    "from domino.core import x\n")
    stage.write_text("from domino.curation.run import run_curation\nimport domino.evaluation.sandbox\n"
                     "def g():\n    from domino.stages import run\n    from domino.training.objective import f\n")
    assert {"domino.curation.run", "domino.evaluation.sandbox", "domino.stages.run"} <= imports_of(stage)

    class P:  # a path that reports itself relative to ROOT
        def __init__(self, path):
            self.path = path

        def read_text(self):
            return self.path.read_text()

        def relative_to(self, _):
            return self.path.name

    core_bad = import_problems(P(core), "core")
    assert len(core_bad) == 3 and not any("domino.core.x" in b for b in core_bad)  # module, name, stages
    stage_bad = import_problems(P(stage), "synthesis")
    assert any("curation.run" in b and "runner" in b for b in stage_bad)
    assert any("evaluation.sandbox" in b and "later stage" in b for b in stage_bad)
    assert any("domino.stages" in b for b in stage_bad)
    assert not any("training.objective" in b for b in stage_bad)  # an earlier stage's helper is fine


def test_the_stage_table_drives_the_cli_the_api_and_the_entry_scripts():
    from domino import api, cli
    from domino.stages import STAGES
    usage = cli.usage()
    for name, st in STAGES.items():
        assert (ROOT / "conf" / f"{st.config}.yaml").exists(), name
        script = ROOT / f"{st.config}.py"
        assert script.exists() and f'run_stage("{name}", cfg)' in script.read_text(), script
        assert f'config_name="{st.config}"' in script.read_text(), script
        assert callable(getattr(api, name)) and f"  {name}" in usage, name
        assert callable(st.load()), st.runner
        assert all(hasattr(r, "problem") for r in st.schema.values()), name
    # nothing else lists the stages: the CLI and the API have no table of their own
    for path in (SRC / "cli.py", SRC / "api.py"):
        text = path.read_text()
        assert not re.search(r"^\s*[A-Z_]+\s*=\s*\{\s*\"train\"", text, re.M), f"{path.name} keeps a stage list"


def test_every_stage_returns_one_shape(tmp_path):
    from domino.stages import STAGES
    (tmp_path / "merged").mkdir()  # an earlier run's merge: not this run's output
    raw = {"output_dir": str(tmp_path), "adapter": str(tmp_path / "adapter"), "steps": 4, "resumed": True,
           "metrics": {"train/loss": 1.5}, "config": {"x": 1}}
    res = STAGES["finetune"].result(raw)
    assert res == {"output_dir": str(tmp_path), "metrics": {"steps": 4, "train/loss": 1.5},
                   "artifacts": {"adapter": str(tmp_path / "adapter")}}
    # a stage whose runner names no files (pass@k returns its summary): the files it wrote in output_dir
    (tmp_path / "summary.json").write_text("{}")
    res = STAGES["evaluate"].result({"pass@1": 0.5, "tasks": 3}, {"paths": {"output_dir": str(tmp_path)}})
    assert res == {"output_dir": str(tmp_path), "metrics": {"pass@1": 0.5, "tasks": 3},
                   "artifacts": {"summary": str(tmp_path / "summary.json")}}


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
        named = set(re.findall(r"\b(\w+\.py)\b", text))
        for f in named:
            assert any(base.rglob(f)) or (SRC / f).exists() or (ROOT / f).exists(), \
                f"README layout: {name} names {f}, which is not in the tree"
        if name.endswith("/"):  # every module of a package is named in its entry
            missing = sorted(p.name for p in base.rglob("*.py") if p.name != "__init__.py" and p.name not in named)
            assert not missing, f"README layout: {name} does not name {missing}"
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir()}
    assert not sorted(g for g in groups if g + "/" not in conf_lines), "README layout misses a conf group"


def test_engines_threads_and_devices_are_set_up_only_by_the_engine_factory():
    """One engine factory (domino.core.generation.factory): no other module builds a VLLMEngine, sets
    torch's threads or resolves an engine device itself."""
    bad = []
    factory, engine = SRC / "core" / "generation" / "factory.py", SRC / "core" / "generation" / "vllm.py"
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


def test_tests_mirror_the_package_layout():
    """tests/<package>/ for the library and every stage package (their unit and stage tests), and
    nothing else but the cross-cutting tests (configs, faults, packaging, ...) at the top."""
    tests = ROOT / "tests"
    dirs = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert dirs == {"core", *ORDER}, sorted(dirs)
    for d in dirs:
        assert list((tests / d).glob("test_*.py")), f"tests/{d}/ holds no test"
