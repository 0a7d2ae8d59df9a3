"""Part B of a study (`study.sft`): the loop the paper measures. For each arm, the same curation
(the model as its own judge and answerer), the same number of SFT records, the same LoRA budget,
then greedy Pass@1 on every test problem; the base model is the `base` arm (no SFT).

Arms (`study.sft.arms`, name -> source):
- `{config: <trained config>}`: its final sample set of training seed seeds_of(config)[r]
  (`{regime}` in the name is the regime the pilot chose, study/pilot.py);
- `{baseline: few_shot|zero_shot|magpie}`: that baseline's sample set of sampling seed
  baseline_seeds[r];
- `{references: true}`: the training references themselves, each answered `answers` times at
  `temperature` with the responses stage's prompt, every answer run in the sandbox against the
  reference's own tests and kept only if it passes (the cheapest thing a user could do).
Replicate r re-draws everything that is random: prompt training and sampling (their seeds), the
answers, the SFT record order and LoRA init (finetune seed r).

Everything a report needs lands in study.dir/loop/ (committed): sft/<arm>_r<r>.jsonl (every
curated record; the first n_records after a seeded shuffle are trained on), curation/<arm>_r<r>.json
(the funnel), adapters/<arm>_r<r>/ (LoRA config, provenance, lineage; its weights, ~4 MB at r 8, stay
out of git: .gitignore), eval/<arm>_r<r>/ (completions, verdicts, summary).
The test problems are the held-out split minus the texts `data.val_size` used for val/nll_dom
(which picked learning rates), so no problem that chose a setting scores it.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domino.core.config import compose
from domino.core.records import publish_files, read_jsonl, write_jsonl, write_text_atomic
from domino.study.tasks import Task

if TYPE_CHECKING:
    from domino.study.run import Study

log = logging.getLogger(__name__)


def loop_dir(study: "Study") -> Path:
    return study.dir / "loop"


def replicates(study: "Study") -> list[int]:
    return list(range(int(study.s.sft.replicates)))


def arm_names(study: "Study") -> list[str]:
    return ["base"] + [a for a in study.s.sft.arms]


def backbone_overrides(study: "Study") -> list[str]:
    """The `backbone` overrides of study.common: finetune.py and evaluate.py have no domain group."""
    return [o for o in study.s.common if o.split("=", 1)[0].lstrip("+~").split(".")[0] == "backbone"]


def run_name(arm: str, r: int | None) -> str:
    return arm if r is None else f"{arm}_r{r}"


# ---------------------------------------------------------------------------------- the split
def split(study: "Study") -> dict[str, list[str]]:
    """Task ids of the training references, the validation texts (val/nll_dom) and the test set."""
    from domino.core.config import plain
    from domino.core.domains import load_domain
    path = loop_dir(study) / "split.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = compose("train", [*study.s.common, *study.s.train, f"paths.output_dir={study.work}",
                            f"paths.root_dir={study.root}"])
    refs, held = load_domain(**plain(cfg.domain))
    n_val = int(cfg.data.val_size or 0)
    out = {"references": [r["id"] for r in refs], "val": [r["id"] for r in held[:n_val]],
           "test": [r["id"] for r in held[n_val:]], "reference_texts": {r["id"]: r["text"] for r in refs}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------------- arms -> samples
def arm_set(study: "Study", arm: str, r: int) -> str:
    """The sample set (a study.dir/samples/<set>.jsonl stem) an arm's replicate r curates."""
    spec = dict(study.s.sft.arms[arm])
    if spec.get("config"):
        from domino.study.pilot import chosen_regime
        config = str(spec["config"]).format(regime=chosen_regime(study))
        seeds = study.seeds_of(config)
        if r >= len(seeds):
            raise ValueError(f"study.sft: arm {arm} replicate {r} needs a training seed, {config} has {seeds}")
        return study.set_name(config, seeds[r], study.epochs)
    if spec.get("baseline"):
        seeds = study.baseline_seeds()
        if r >= len(seeds):
            raise ValueError(f"study.sft: arm {arm} replicate {r} needs baseline_seeds with {r + 1} entries")
        return study.baseline_set(str(spec["baseline"]), seeds[r])
    raise ValueError(f"study.sft.arms.{arm}: expected config:, baseline: or references:")


def _backbone(study: "Study") -> dict[str, Any]:
    from domino.core.config import plain
    cfg = compose("train", [*study.s.common, f"paths.output_dir={study.work}", f"paths.root_dir={study.root}"])
    return plain(cfg.backbone)


def _curate_config(study: "Study", extra: list[str] = ()):
    """The curate stage's config of every arm: the study's backbone and `sft.curate` overrides."""
    return compose("curate", [*backbone_overrides(study), *study.s.sft.curate, *extra,
                              f"paths.output_dir={study.work}", f"paths.root_dir={study.root}"])


def _curation_cfg(study: "Study") -> dict[str, Any]:
    from domino.core.config import plain
    return plain(_curate_config(study).curation)


# ---------------------------------------------------------------------------------- tasks
def base_tasks(study: "Study") -> list[Task]:
    return [_evaluate_task(study, "base", None, rank=3)]


def loop_tasks(study: "Study") -> list[Task]:
    tasks: list[Task] = []
    for r in replicates(study):
        for arm in study.s.sft.arms:
            tasks += [_curate_task(study, arm, r), _finetune_task(study, arm, r), _evaluate_task(study, arm, r)]
    return tasks + [_report_task(study, [t.name for t in tasks if t.kind == "evaluate"])]


def _report_task(study: "Study", evaluations: list[str]) -> Task:
    """Part B's report as soon as its last Pass@1 exists, so it is committed while Part A goes on
    (the study's end writes it again, with Part A's)."""
    def run() -> None:
        from domino.study.loop_report import write_loop_report
        t0 = time.perf_counter()
        write_loop_report(study.dir, study.s)
        study._record_time("loop report", time.perf_counter() - t0)

    # the lowest rank of what it needs: lending it raises nothing, and it runs right after the last
    return Task("loop report", "report", 0.0, run, lambda: _report_is_current(study),
                lambda: ["evaluate base", *evaluations], _rank(max(replicates(study))))


def _report_is_current(study: "Study") -> bool:
    """The committed loop report covers every scored run (an arm added later, or a replicate scored
    after the report was written, makes it stale)."""
    from domino.study.loop_report import is_scored
    path = study.dir / "loop_report.json"
    if not path.exists():
        return False
    arms = json.loads(path.read_text()).get("arms", {})
    for arm in arm_names(study):
        for r in [None] if arm == "base" else replicates(study):
            scored = is_scored(loop_dir(study) / "eval" / run_name(arm, r))
            if scored and ("-" if r is None else str(r)) not in arms.get(arm, {}).get("replicates", {}):
                return False
    return True


def _sft_path(study: "Study", arm: str, r: int) -> Path:
    return loop_dir(study) / "sft" / f"{run_name(arm, r)}.jsonl"


def _adapter_dir(study: "Study", arm: str, r: int) -> Path:
    return loop_dir(study) / "adapters" / run_name(arm, r)


def _rank(r: int) -> int:
    # the first replicate of every arm before anything else of Part A: the headline result first;
    # then the second, which gives the headline its replicate spread (the noise floor)
    return {0: 2, 1: 1}.get(r, 0)


def _curate_task(study: "Study", arm: str, r: int) -> Task:
    name = f"curate {run_name(arm, r)}"
    spec = dict(study.s.sft.arms[arm])
    out = _sft_path(study, arm, r)

    def needs() -> list[str]:
        if spec.get("references"):
            return []
        try:
            return [study.sample_task_name(arm_set(study, arm, r))]
        except RuntimeError:  # the pilot has not chosen the regime yet
            return ["pilot verdict"]

    def run() -> None:
        t0 = time.perf_counter()
        if spec.get("references"):
            recs, funnel = _answer_references(study, r)
        else:
            recs, funnel = _curate_set(study, arm, r)
        write_text_atomic(loop_dir(study) / "curation" / f"{run_name(arm, r)}.json", json.dumps(funnel, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(out.with_suffix(".tmp"), recs)
        out.with_suffix(".tmp").replace(out)
        study._record_time(name, time.perf_counter() - t0)

    return Task(name, "curate", 3e5, run, out.exists, needs, _rank(r))


def _curate_set(study: "Study", arm: str, r: int) -> tuple[list[dict], dict]:
    from domino.stages import run as run_stage
    set_name = arm_set(study, arm, r)
    work = study.work / "loop" / run_name(arm, r)
    work.mkdir(parents=True, exist_ok=True)  # a crashed curation resumes there (finished stages are skipped)
    samples = read_jsonl(study.dir / "samples" / f"{set_name}.jsonl", required=["id", "text"])
    write_jsonl(work / "samples.jsonl", [{"id": x["id"], "text": x["text"], "finish_reason": x.get("finish_reason")}
                                         for x in samples])
    cfg = _curate_config(study, [f"curation.judge.generation.seed={r}", f"curation.responses.generation.seed={r}",
                                 f"samples={work / 'samples.jsonl'}", f"output_dir={work}",
                                 f"references={study.dir / 'data' / 'references.jsonl'}",
                                 f"progress={str(bool(study.cfg.get('progress', True))).lower()}"])
    res = run_stage("curate", cfg)["artifacts"]
    recs = read_jsonl(res["sft"]) if res.get("sft") else []
    funnel = json.loads(Path(res["report_json"]).read_text()) if res.get("report_json") else {}
    return recs, {"set": set_name, "n_samples": len(samples), "n_sft": len(recs), "report": funnel}


def _answer_references(study: "Study", r: int) -> tuple[list[dict], dict]:
    """Every training reference answered `answers` times with the responses stage's own prompt and
    sampling temperature `temperature`; an answer is kept when its code passes the reference's tests."""
    from domino.core.benchmarks import load_benchmark
    from domino.core.generation.chat import build_generator
    from domino.core.generation.code import extract_code
    from domino.core.sandbox import Sandbox, SandboxConfig
    from domino.curation.responses import build_conversation
    from domino.curation.sft import to_sft
    cur = _curation_cfg(study)
    opt = dict(study.s.sft.references)
    sp = split(study)
    ids, refs = sp["references"], sp["reference_texts"]
    problems = {p["task_id"]: p for p in load_benchmark(str(opt.get("benchmark", "humaneval")))}
    missing = [i for i in ids if i not in problems]
    if missing:
        raise ValueError(f"study.sft references: {missing[:3]} are not problems of the benchmark (no tests)")
    resp = cur["responses"]
    gen_cfg = {**resp["generation"], "sampling": {**resp["generation"]["sampling"],
                                                  "temperature": float(opt.get("temperature", 0.8))}}
    convs = [build_conversation(refs[i], resp["template"], resp.get("system")) for i in ids]
    sandbox = Sandbox(SandboxConfig(workers=2))
    kept, tried, passed = [], 0, 0
    for a in range(int(opt.get("answers", 4))):
        gen = build_generator(resp.get("model"), _backbone(study),
                              {**gen_cfg, "seed": 1000 * r + a}, where="study.sft.references",
                              shared_engine=cur.get("engine"))
        answers = gen(convs)
        for i, ans in zip(ids, answers):
            tried += 1
            code = extract_code(ans, "python")
            if code is None:
                continue
            p = problems[i]
            res = sandbox.run(p["prompt"] + "\n" + code, p["tests"], p["test_type"])
            if res.passed:
                passed += 1
                kept.append(to_sft({"id": f"{i}#a{a}", "text": refs[i], "response": ans},
                                   cur["sft"]["format"], cur["sft"].get("user_template", "{text}"),
                                   cur["sft"].get("system")))
    return kept, {"set": "references", "n_problems": len(ids), "answers": tried, "passed": passed, "n_sft": len(kept)}


def _finetune_task(study: "Study", arm: str, r: int) -> Task:
    name = f"finetune {run_name(arm, r)}"
    out = _adapter_dir(study, arm, r)
    n = int(study.s.sft.n_records)

    def run() -> None:
        from domino.stages import run as run_stage
        t0 = time.perf_counter()
        recs = read_jsonl(_sft_path(study, arm, r))
        if not recs:  # curation kept nothing: nothing to train, the report says so
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "study_sft.json", json.dumps({"arm": arm, "replicate": r, "n_records": 0,
                                                                  "n_available": 0}))
            return
        random.Random(f"{arm}:{r}").shuffle(recs)  # which n records: seeded, the same on every machine
        data = study.work / "loop" / f"{run_name(arm, r)}.train.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(data, recs[:n])
        run_dir = study.work / "loop" / f"finetune_{run_name(arm, r)}"
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run starts over (its seed reproduces it)
        ov = [*backbone_overrides(study), *study.s.sft.finetune, f"data={data}", f"seed={r}",
              f"paths.output_dir={run_dir}", f"paths.root_dir={study.root}"]
        res = run_stage("finetune", compose("finetune", ov))
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(res["artifacts"]["adapter"], tmp)
        from domino.core.provenance import file_sha256
        weights = {p.name: file_sha256(p) for p in sorted(tmp.glob("adapter_model.*"))}  # what git does not keep
        write_text_atomic(tmp / "study_sft.json", json.dumps(
            {"arm": arm, "replicate": r, "n_records": min(n, len(recs)), "n_available": len(recs), "weights": weights,
             "metrics": res.get("metrics"), "seconds": round(time.perf_counter() - t0, 1)}, indent=1, default=str))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        study._record_time(name, time.perf_counter() - t0)

    def done() -> bool:
        # the adapter's weights are not committed (over the repository's file-size limit; the
        # SFT set and seed reproduce them): without them, an unscored adapter is trained again
        evaluated = (loop_dir(study) / "eval" / run_name(arm, r) / "summary.json").exists()
        weights = any(out.glob("adapter_model.*")) or not (out / "adapter_config.json").exists()
        return (out / "study_sft.json").exists() and (evaluated or weights)

    return Task(name, "finetune", 1e6, run, done, lambda: [f"curate {run_name(arm, r)}"], _rank(r))


def _evaluate_task(study: "Study", arm: str, r: int | None, rank: int | None = None) -> Task:
    name = f"evaluate {run_name(arm, r)}"
    out = loop_dir(study) / "eval" / run_name(arm, r)

    def run() -> None:
        from domino.stages import run as run_stage
        t0 = time.perf_counter()
        if r is not None and not (_adapter_dir(study, arm, r) / "adapter_config.json").exists():
            out.mkdir(parents=True, exist_ok=True)  # no SFT records, no adapter: no Pass@1 for this run
            write_text_atomic(out / "summary.json", json.dumps({"skipped": "no SFT records"}))
            return
        test = split(study)["test"]
        work = study.work / "loop" / f"eval_{run_name(arm, r)}"  # resumes completion by completion
        adapter = [] if r is None else [f"adapter={_adapter_dir(study, arm, r)}"]
        cfg = compose("evaluate", [*backbone_overrides(study), *study.s.sft.evaluate, *adapter,
                                   "benchmark.task_ids=[" + ",".join(json.dumps(t) for t in test) + "]",
                                   f"paths.output_dir={work}", f"paths.root_dir={study.root}"])
        summary = run_stage("evaluate", cfg)["metrics"]
        publish_files(work, out, ("completions.jsonl", "results.jsonl", "summary.json", "summary.md"))
        study._record_time(name, time.perf_counter() - t0)
        log.info("study: %s pass@1 %.4f", run_name(arm, r), summary.get("pass@1", float("nan")))

    needs = (lambda: []) if r is None else (lambda: [f"finetune {run_name(arm, r)}"])
    return Task(name, "evaluate", 5e5, run, lambda: (out / "summary.json").exists(), needs,
                _rank(r if r is not None else 0) if rank is None else rank)
