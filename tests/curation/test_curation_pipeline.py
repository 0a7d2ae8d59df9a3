"""The curation pipeline end to end on planted samples with a fake deterministic judge/solver:
the funnel, the report, resume after a crash, reuse after an upstream change, SFT output."""
import json
import shutil

import pytest
from omegaconf import OmegaConf

from domino.core.records import RecordError, read_jsonl
from domino.curation.run import run_curation

from ..conftest import CONF, FIXTURES

HELDOUT = {"name": "heldout", "path": str(FIXTURES / "curation_heldout.jsonl")}


class FakeModel:
    """Canned outputs keyed on markers in the sample text; counts calls and prompts seen.
    `crash_after` raises on that call, like a killed process."""

    fingerprint = "fake-v1"
    batch_size = 2

    def __init__(self, crash_after=None):
        self.calls, self.seen, self.crash_after = 0, [], crash_after

    def __call__(self, convs):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise KeyboardInterrupt("killed")
        out = []
        for c in convs:
            u = c[-1]["content"]
            self.seen.append(u)
            if "Grade the problem" in u:
                out.append("Score: poor" if "[bad]" in u else
                           "good... or excellent?" if "[garbled]" in u else "Clear and solvable.\nScore: good")
            elif "unit tests" in u:
                out.append("```python\nassert f(2) == 2\nassert f(3) == 3\n```" if "[failing]" not in u else
                           "```python\nassert f(2) == 3\n```")
            else:
                out.append("no code at all" if "[nocode]" in u else
                           "Reasoning.\n```python\ndef f(:\n```" if "[syntax]" in u else
                           "Reasoning: identity.\n```python\ndef f(x):\n    return x\n```")
        return out


class FakeScorer(FakeModel):
    def choose(self, convs, options, prefix):
        assert prefix == "Score:" and options[0] == "very poor"
        return ["very poor" if "[bad]" in c[-1]["content"] else "excellent" for c in convs]


@pytest.fixture()
def cfg():
    c = OmegaConf.load(CONF / "curation" / "default.yaml")
    c.judge.generation.batch_size = 2
    c.responses.generation.batch_size = 2
    return c


@pytest.fixture()
def run_dir(tmp_path):
    shutil.copy(FIXTURES / "curation_samples.jsonl", tmp_path / "samples.jsonl")
    return tmp_path


def _run(cfg, run_dir, model, **kw):
    kw.setdefault("references", FIXTURES / "curation_references.jsonl")
    kw.setdefault("eval_sets", [HELDOUT])
    return run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=model, progress=False, **kw)


def _funnel(run_dir):
    rep = json.loads((run_dir / "curation_report.json").read_text())
    return {r["stage"]: r for r in rep["funnel"]}, rep


def test_funnel_report_and_sft(cfg, run_dir, tiny_backbone):
    model = FakeModel()
    res = _run(cfg, run_dir, model)
    funnel, rep = _funnel(run_dir)
    assert [(s, funnel[s]["n_in"], funnel[s]["n_out"]) for s in funnel] == [
        ("normalise", 13, 12), ("exact_dedup", 12, 11), ("near_dup", 11, 10), ("memorisation", 10, 9),
        ("decontaminate", 9, 7), ("judge", 7, 5), ("responses", 5, 5), ("code_checks", 5, 3)]
    assert funnel["judge"]["reasons"] == {"grade:poor": 1, "grade:unknown": 1}
    assert funnel["code_checks"]["reasons"] == {"syntax_error": 1, "no_code": 1}
    assert rep["judge_grades"]["unknown"] == 1 and rep["judge_grades"]["good"] == 5
    assert {(m["sample_id"], m["eval_set"], m["eval_id"]) for m in rep["decontamination"]["matches"]} == {
        ("s-04", "humaneval", "HumanEval/0"), ("s-05", "heldout", "held-0")}
    assert rep["dropped_examples"]["memorisation"]["ngram_overlap"][0]["id"] == "s-03"
    md = (run_dir / "curation_report.md").read_text()
    assert "HumanEval/0" in md and "| judge | 7 | 5 | 2 |" in md and "grade:unknown: 1" in md
    # curated records: sample + checks + response + code
    curated = read_jsonl(run_dir / "curated.jsonl")
    assert [r["id"] for r in curated] == ["s-00", "s-09", "s-12"] and res["n_sft"] == 3
    assert curated[0]["code"] == "def f(x):\n    return x" and curated[0]["method"] == "domino"
    assert set(curated[0]["checks"]) == {"normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate",
                                         "judge", "responses", "code_checks"}
    # SFT: loads with datasets (jsonl and the saved dataset) and renders with the chat template
    from datasets import load_dataset, load_from_disk
    ds = load_from_disk(res["sft_dataset"])
    js = load_dataset("json", data_files=res["sft"], split="train")
    assert len(ds) == len(js) == 3 and ds[0]["messages"][0]["role"] == "user"
    tok = tiny_backbone.tokenizer
    rendered = tok.apply_chat_template(ds[0]["messages"], tokenize=False)
    assert curated[0]["text"] in rendered and "```python\ndef f(x):" in rendered
    assert rendered.count("<|im_start|>assistant") == 1 and rendered.rstrip().endswith("<|im_end|>")


def test_alpaca_format(cfg, run_dir):
    cfg.sft.format = "alpaca"
    cfg.sft.save_dataset = False
    _run(cfg, run_dir, FakeModel())
    recs = read_jsonl(run_dir / "sft.jsonl")
    assert set(recs[0]) == {"id", "instruction", "input", "output"} and "def f(x)" in recs[0]["output"]
    assert not (run_dir / "sft_dataset").exists()


def test_killed_run_resumes_without_redoing_finished_stages(cfg, run_dir, tmp_path_factory):
    crashing = FakeModel(crash_after=5)  # judge takes 4 calls (7 records, batches of 2); dies in responses
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, run_dir, crashing)
    cur = run_dir / "curation"
    assert json.loads((cur / "06_judge.meta.json").read_text())["complete"] is True
    assert not json.loads((cur / "07_responses.meta.json").read_text())["complete"]
    assert len(read_jsonl(cur / "07_responses.jsonl")) == 2  # the one finished batch was kept
    mtimes = {p.name: p.stat().st_mtime_ns for p in cur.glob("0[1-6]_*")}

    resumed = FakeModel()
    _run(cfg, run_dir, resumed)
    assert {p.name: p.stat().st_mtime_ns for p in cur.glob("0[1-6]_*")} == mtimes  # untouched
    assert not any("Grade the problem" in u for u in resumed.seen)  # the judge did not run again
    assert sum("Solve the following" in u for u in resumed.seen) == 3  # only the 3 unanswered ones
    funnel, _ = _funnel(run_dir)
    assert funnel["judge"]["skipped"] and not funnel["responses"]["skipped"]

    # the resumed result is the uninterrupted one
    clean = tmp_path_factory.mktemp("clean")
    shutil.copy(FIXTURES / "curation_samples.jsonl", clean / "samples.jsonl")
    _run(cfg, clean, FakeModel())
    for name in ("curated.jsonl", "sft.jsonl"):
        assert read_jsonl(run_dir / name) == read_jsonl(clean / name)

    # a third run does nothing at all
    idle = FakeModel()
    _run(cfg, run_dir, idle)
    assert idle.calls == 0


def test_changes_redo_only_what_they_affect(cfg, run_dir):
    _run(cfg, run_dir, FakeModel())
    # an upstream change: the judge's verdicts on unchanged texts are reused, not regenerated
    cfg.near_dup.threshold = 0.9  # s-02 (Jaccard 0.81) now survives near-dup
    again = FakeModel()
    _run(cfg, run_dir, again)
    judged = [u for u in again.seen if "Grade the problem" in u]
    assert len(judged) == 1 and "can be missing" in judged[0]
    funnel, _ = _funnel(run_dir)
    assert funnel["normalise"]["skipped"] and not funnel["near_dup"]["skipped"]
    meta = json.loads((run_dir / "curation" / "06_judge.meta.json").read_text())
    assert meta["n_reused"] == 7 and meta["n_in"] == 8
    # a judge config change invalidates its verdicts
    cfg.judge.min_grade = "excellent"
    strict = FakeModel()
    _run(cfg, run_dir, strict)
    assert sum("Grade the problem" in u for u in strict.seen) == 8
    assert _funnel(run_dir)[0]["judge"]["n_out"] == 0


def test_unknown_judge_outputs_are_counted(cfg, run_dir):
    cfg.code_checks.enabled = False
    canned = iter([None, "", "I refuse.", "Score: ten out of ten", "Score: good", "Score: good", "Score: good"])
    solver = FakeModel()

    def judge(convs):
        return [next(canned) for _ in convs]
    res = _run(cfg, run_dir, {"judge": judge, "responses": solver})
    funnel, rep = _funnel(run_dir)
    assert rep["judge_grades"]["unknown"] == 4 and rep["judge_grades"]["good"] == 3
    assert funnel["judge"]["reasons"] == {"grade:unknown": 4} and res["n_sft"] == 3
    assert "| unknown | 4 | 57.1% |" in (run_dir / "curation_report.md").read_text()


def test_logprob_judge_never_unknown(cfg, run_dir):
    cfg.judge.mode = "logprob"
    _run(cfg, run_dir, FakeScorer())
    funnel, rep = _funnel(run_dir)
    assert rep["judge_grades"]["unknown"] == 0 and rep["judge_grades"]["excellent"] == 6
    assert funnel["judge"]["reasons"] == {"grade:very poor": 1}
    with pytest.raises(TypeError, match="logprob"):
        cfg.judge.min_grade = "good"  # a new config: the judge runs again, with a plain callable
        _run(cfg, run_dir, {"judge": lambda convs: ["Score: good"] * len(convs), "default": FakeModel()})


def test_run_tests_in_sandbox_keeps_only_passing_pairs(cfg, tmp_path):
    recs = [{"id": "ok", "text": "Write the identity function f(x) that returns its argument unchanged."},
            {"id": "bad", "text": "Write the identity function f(x), here with wrong tests. [failing]"}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for s in ("normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate", "judge"):
        cfg[s].enabled = False
    cfg.code_checks.run_tests = True
    cfg.code_checks.sandbox.isolation = "process"
    run_curation(cfg, tmp_path / "samples.jsonl", tmp_path, generators=FakeModel(), progress=False)
    assert [r["id"] for r in read_jsonl(tmp_path / "curated.jsonl")] == ["ok"]
    dropped = read_jsonl(tmp_path / "curation" / "08_code_checks.dropped.jsonl")
    assert dropped[0]["id"] == "bad" and dropped[0]["dropped"]["reason"] == "tests_failed"
    assert read_jsonl(tmp_path / "curated.jsonl")[0]["tests"].startswith("assert f(2) == 2")


def test_sources_found_from_the_synthesis_run(cfg, run_dir):
    """The run's lineage.json is the one channel: samples.meta.json naming the same files is not read."""
    (run_dir / "samples.meta.json").write_text(json.dumps({"ckpt_meta": {
        "references": str(FIXTURES / "curation_references.jsonl"), "heldout": HELDOUT["path"]}}))
    with pytest.raises(FileNotFoundError, match="lineage.json"):
        run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=FakeModel(), progress=False)
    (run_dir / "lineage.json").write_text(json.dumps({
        "samples": str(run_dir / "samples.jsonl"), "references": str(FIXTURES / "curation_references.jsonl"),
        "heldout": HELDOUT["path"]}))
    cfg.decontaminate.heldout = True
    run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=FakeModel(), progress=False)
    funnel, rep = _funnel(run_dir)
    assert funnel["memorisation"]["reasons"] == {"ngram_overlap": 1}
    assert set(rep["decontamination"]["eval_sets"]) == {"heldout", "humaneval"}
    assert funnel["decontaminate"]["n_dropped"] == 2


def test_lineage_from_before_the_backbone_record_is_refused_not_replaced(cfg, run_dir):
    """A samples lineage written before it named the backbone: curating with the default model
    instead of the samples' own would be silent, so a model stage refuses, naming the remedy;
    backbone= (or injected models) go ahead."""
    (run_dir / "lineage.json").write_text(json.dumps({
        "samples": str(run_dir / "samples.jsonl"), "references": str(FIXTURES / "curation_references.jsonl")}))
    with pytest.raises(ValueError, match=r"lineage.json does not name the backbone.*rerun the synthesize command"):
        run_curation(cfg, run_dir / "samples.jsonl", run_dir, eval_sets=[HELDOUT], progress=False)
    assert not (run_dir / "curated.jsonl").exists()
    result = run_curation(cfg, run_dir / "samples.jsonl", run_dir, eval_sets=[HELDOUT], generators=FakeModel(),
                          progress=False)
    assert result["n_sft"] > 0


def test_a_moved_sample_directory_keeps_its_provenance(cfg, run_dir, tmp_path):
    """lineage.json holds absolute paths: a directory copied elsewhere still names its own samples
    file (same name, same directory), so its references are found; another file's lineage is not."""
    lin = {"samples": "/elsewhere/run/samples.jsonl", "references": str(FIXTURES / "curation_references.jsonl"),
           "backbone": {"path": "tiny"}, "samples_fingerprint": "abc"}
    (run_dir / "lineage.json").write_text(json.dumps(lin))
    from domino.curation.sources import run_sources
    found = run_sources(run_dir / "samples.jsonl")
    assert found["references"] == lin["references"] and found["fingerprint"] == "abc"
    (run_dir / "lineage.json").write_text(json.dumps({**lin, "samples": "/elsewhere/run/other.jsonl"}))
    assert run_sources(run_dir / "samples.jsonl")["references"] is None


def test_errors_are_explicit(cfg, run_dir):
    with pytest.raises(FileNotFoundError, match="memorisation.references"):
        run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=FakeModel(), progress=False)
    cfg.memorisation.enabled = False
    cfg.decontaminate.heldout = True
    with pytest.raises(FileNotFoundError, match="heldout"):
        run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=FakeModel(), progress=False)
    with open(run_dir / "samples.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "s-00", "text": "again"}) + "\n")
    with pytest.raises(RecordError, match=r"samples.jsonl:14: duplicate id"):
        run_curation(cfg, run_dir / "samples.jsonl", run_dir, generators=FakeModel(), progress=False)


def test_curation_configs_compose(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in ("default", "text"):
            c = OmegaConf.to_container(hydra_compose(config_name=f"curation/{name}"), resolve=True)
            c = c.get("curation", c)
            assert c["judge"]["min_grade"] == "average" and c["decontaminate"]["n"] == 13
    assert c["code_checks"]["enabled"] is False and c["decontaminate"]["eval_sets"] == []
    # as a group of synthesize.py (wired with `- curation: default` in its defaults list)
    defaults = OmegaConf.load(CONF / "synthesize.yaml").defaults
    wired = any(isinstance(d, dict) and "curation" in d for d in OmegaConf.to_container(defaults))
    cfg = compose("synthesize", ["curation=text" if wired else "+curation=text"])
    assert cfg.curation.code_checks.enabled is False and cfg.curation.judge.enabled is True


def test_without_responses_curated_is_written_and_sft_skipped(cfg, run_dir, caplog):
    """responses.enabled=false (users bring their own teacher): curated.jsonl holds the filtered
    problems with their checks; the code checks (nothing to check) and the SFT export are skipped
    with a note, and an SFT set from an earlier run with responses does not survive as current."""
    import logging

    from domino.core import lineage
    first = _run(cfg, run_dir, FakeModel())
    assert first["n_sft"] == 3 and (run_dir / "sft.jsonl").exists() and (run_dir / "sft_dataset").exists()
    cfg.responses.enabled = False
    model = FakeModel()
    with caplog.at_level(logging.INFO, logger="domino.curation"):
        res = _run(cfg, run_dir, model)
    assert res["sft"] is None and res["sft_dataset"] is None and res["n_sft"] == 0
    assert not (run_dir / "sft.jsonl").exists() and not (run_dir / "sft_dataset").exists()
    assert not any("unit tests" in u or "Solve the following" in u for u in model.seen)  # judge only
    curated = read_jsonl(run_dir / "curated.jsonl")
    # the five that the judge keeps (the code checks dropped two of them by their code)
    assert [r["id"] for r in curated] == [r["id"] for r in read_jsonl(run_dir / "curation" / "06_judge.jsonl")]
    assert len(curated) == 5 and {"s-00", "s-09", "s-12"} < {r["id"] for r in curated}
    assert all("response" not in r and r["checks"]["judge"] == "good" for r in curated)
    assert set(curated[0]["checks"]) == {"normalise", "exact_dedup", "near_dup", "memorisation", "decontaminate",
                                         "judge"}
    notes = [r.getMessage() for r in caplog.records if "SFT export skipped" in r.getMessage()]
    assert len(notes) == 1 and "curated.jsonl" in notes[0] and "`text`" in notes[0]
    funnel, rep = _funnel(run_dir)
    assert funnel["responses"]["enabled"] is False and funnel["code_checks"]["enabled"] is False
    assert "no responses" in funnel["code_checks"]["note"]
    assert rep["n_sft"] == 0 and rep["outputs"]["sft"] is None and "skipped" in rep["sft_note"]
    md = (run_dir / "curation_report.md").read_text()
    assert "SFT export skipped" in md and "| code_checks | – | – | – | skipped: no responses" in md
    assert lineage.read(run_dir)["sft"] is None and lineage.read(run_dir)["curated"] == str(
        (run_dir / "curated.jsonl").resolve())
    # up to date: the same again is a no-op; responses back on -> SFT again, judge verdicts reused
    assert _run(cfg, run_dir, FakeModel())["n_sft"] == 0
    cfg.responses.enabled = True
    assert _run(cfg, run_dir, FakeModel())["n_sft"] == 3 and (run_dir / "sft.jsonl").exists()


def test_sft_needs_a_response_on_every_record(cfg, run_dir, caplog):
    """Responses disabled but code checks forced on samples that carry their own `response`:
    the checks run on them; samples without one are not turned into assistant-less SFT pairs."""
    recs = read_jsonl(run_dir / "samples.jsonl")
    for r in recs:
        r["response"] = "Own teacher.\n```python\ndef f(x):\n    return x\n```"
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg.responses.enabled = False
    cfg.judge.enabled = False
    res = _run(cfg, run_dir, FakeModel())
    funnel, _ = _funnel(run_dir)
    assert funnel["code_checks"]["enabled"] is True and funnel["code_checks"]["n_out"] == res["n_sft"] > 0
    assert read_jsonl(run_dir / "sft.jsonl")[0]["messages"][-1]["content"].startswith("Own teacher.")


@pytest.mark.parametrize("config,extra", [("curate", []), ("synthesize", ["stage=curate"])])
def test_curate_stage_without_responses(compose, run_dir, caplog, config, extra):
    """curate.py (and the older synthesize.py stage=curate) with no model stage: curated.jsonl, no
    SFT, and the stage reports it instead of failing on the missing SFT file."""
    import logging

    from domino.stages import STAGES
    cfg = compose(config, [*extra, f"samples={run_dir / 'samples.jsonl'}", "progress=false",
                           "curation.memorisation.enabled=false", "curation.judge.enabled=false",
                           "curation.responses.enabled=false"], run_dir)
    with caplog.at_level(logging.INFO, logger="domino"):
        res = STAGES[config].run(cfg)
    curated = res["artifacts"]["curated"]
    assert "sft" not in res["artifacts"] and res["metrics"]["n_sft"] == 0
    assert res["metrics"]["n_curated"] == len(read_jsonl(curated)) > 0
    assert not (run_dir / "sft.jsonl").exists()
    assert any("no SFT export" in r.getMessage() for r in caplog.records if r.name == "domino.curation.run")


def test_curate_py_runs_as_a_process(run_dir, tmp_path):
    """The curate stage's own entry script (no model stage: filters only)."""
    import subprocess
    import sys

    from ..conftest import ROOT
    out = tmp_path / "cur"
    proc = subprocess.run([sys.executable, "curate.py", f"samples={run_dir / 'samples.jsonl'}", f"output_dir={out}",
                           "curation.judge.enabled=false", "curation.responses.enabled=false",
                           "curation.memorisation.enabled=false", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_jsonl(out / "curated.jsonl") and not (out / "sft.jsonl").exists()
