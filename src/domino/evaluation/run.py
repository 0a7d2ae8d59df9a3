"""The evaluation stage: generate (or read) completions, execute them in the sandbox, report pass@k.

Outputs in `output_dir`: completions.jsonl (when generating), results.jsonl (one line per task),
summary.json and summary.md (pass@k, outcome counts, provenance).
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from domino.core import lineage
from domino.core.benchmarks import benchmark_fingerprint, load_benchmark
from domino.core.records import iter_jsonl, write_jsonl, write_text_atomic
from domino.core.sandbox import ExecutionCache, Sandbox, SandboxConfig
from domino.evaluation.passk import aggregate, check_ks, pass_at_k
from domino.evaluation.prompting import program_from_sample

log = logging.getLogger(__name__)


def _progress():
    from domino.core.progress import rich_progress
    return rich_progress("{task.description}", "{task.fields[rate]}")


def completions_from_samples(problems: list[dict], samples: str) -> list[dict]:
    """`samples=` mode: score an existing JSONL of completions (see prompting.program_from_sample)."""
    by_id = {p["task_id"]: p for p in problems}
    counts: Counter = Counter()
    recs = []
    # malformed lines and a record without task_id raise RecordError (a ValueError) with file:line
    for lineno, rec in iter_jsonl(samples, required=["task_id"]):
        where = f"{samples}:{lineno}"
        t = str(rec["task_id"])
        if t not in by_id:
            raise ValueError(f"{where}: task_id {t!r} is not in the selected benchmark")
        recs.append({"task_id": t, "sample_idx": counts[t],
                     "program": program_from_sample(by_id[t], rec, where)})
        counts[t] += 1
    missing = [t for t in by_id if not counts[t]]
    if missing:
        raise ValueError(f"{samples}: no samples for {len(missing)} task(s), e.g. {missing[:3]}; "
                         "restrict the benchmark with benchmark.task_ids=[...] or benchmark.limit=N")
    return recs


def score(problems: list[dict], completions: list[dict], sandbox: Sandbox) -> dict[str, list[dict]]:
    by_id = {p["task_id"]: p for p in problems}
    jobs = [(c["program"], by_id[c["task_id"]]["tests"], by_id[c["task_id"]]["test_type"])
            for c in completions]
    per_task: dict[str, list[dict]] = defaultdict(list)
    with _progress() as bar:
        job = bar.add_task("execute", total=len(jobs), rate="")
        started = time.monotonic()

        def on_result(i, r):
            n = bar.tasks[0].completed + 1
            bar.update(job, advance=1, rate=f"{n / max(1e-9, time.monotonic() - started):.1f} exec/s")

        results = sandbox.run_many(jobs, on_result=on_result)
    for c, r in zip(completions, results):
        per_task[c["task_id"]].append({"sample_idx": c["sample_idx"], "status": r.status,
                                       "passed_tests": r.passed_tests, "total_tests": r.total_tests,
                                       "detail": r.detail[:500], "cached": r.cached,
                                       "seconds": round(r.seconds, 4)})
    return per_task


def write_report(output_dir: Path, problems: list[dict], per_task: dict[str, list[dict]], ks: list[int],
                 provenance: dict) -> dict:
    # every file whole or not at all (temp + rename): summary.json is what says a run is done
    counts, rows = {}, []
    for p in problems:
        samples = sorted(per_task.get(p["task_id"], []), key=lambda s: s["sample_idx"])
        n, c = len(samples), sum(s["status"] == "passed" for s in samples)
        counts[p["task_id"]] = (n, c)
        rows.append({"task_id": p["task_id"], "n": n, "c": c,
                     **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n}, "samples": samples})
    write_jsonl(output_dir / "results.jsonl", rows)
    statuses = Counter(s["status"] for ss in per_task.values() for s in ss)
    summary = {**aggregate(counts, ks), "tasks": len(problems), "samples": sum(statuses.values()),
               "outcomes": dict(sorted(statuses.items())), **provenance}
    write_text_atomic(output_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    lines = ["| benchmark | tasks | samples | " + " | ".join(f"pass@{k}" for k in ks)
             + " | passed | failed | error | timeout |",
             "|---|---|---|" + "---|" * len(ks) + "---|---|---|---|",
             f"| {provenance['benchmark']['name']} | {len(problems)} | {summary['samples']} | "
             + " | ".join(f"{100 * summary[f'pass@{k}']:.2f}" for k in ks) + " | "
             + " | ".join(str(statuses.get(s, 0)) for s in ("passed", "failed", "error", "timeout")) + " |",
             "", f"model: {provenance.get('model')}  adapter: {provenance.get('adapter')}  "
             f"benchmark fingerprint: {provenance['benchmark']['fingerprint']}",
             f"sampling: {json.dumps(provenance.get('sampling'))}  "
             f"sandbox: {provenance['sandbox']['isolation']}"]
    gen = provenance.get("generation")
    if gen:
        lines.append(f"dtype: {provenance.get('dtype')}  prompt style: {provenance.get('prompt_style')}  generated: "
                     f"{gen['new_completions']} completions, {gen['new_tokens']} tokens in {gen['seconds']} s "
                     f"({gen['tokens_per_s']} tokens/s"
                     + (f"; prefills {gen['prefill_s']} s, decoding {gen['decode_s']} s" if "decode_s" in gen else "")
                     + ")")
    write_text_atomic(output_dir / "summary.md", "\n".join(lines) + "\n")
    return summary


def check_same_benchmark(output_dir: Path, bench: dict, problems: list[dict]) -> None:
    """Refuse a directory that holds the evaluation of another benchmark (its summary names another
    benchmark or file, or its completions answer tasks this benchmark does not have): a rerun there
    would mix two benchmarks' completions and overwrite the other's verdicts. The same benchmark
    with more tasks (a larger `limit`) extends the run."""
    fp = benchmark_fingerprint(problems)
    summary = output_dir / "summary.json"
    old = None
    if summary.exists():
        try:
            old = (json.loads(summary.read_text()).get("benchmark") or {})
        except ValueError:
            old = None
    same_source = old and (old.get("name"), old.get("path")) == (bench.get("name"), bench.get("path"))
    if old and old.get("fingerprint") not in (None, fp) and not same_source:
        raise FileExistsError(f"{output_dir} holds the evaluation of benchmark {old.get('name')} (fingerprint "
                              f"{old.get('fingerprint')}); this run's benchmark {bench.get('name')} is {fp}: use "
                              "another directory (hydra.run.dir=...)")
    comp = output_dir / "completions.jsonl"
    if comp.exists():
        ids = {p["task_id"] for p in problems}
        foreign = next((r.get("task_id") for _, r in iter_jsonl(comp, skip_torn_tail=True)
                        if r.get("task_id") not in ids), None)
        if foreign is not None:
            raise FileExistsError(f"{comp} holds completions of task {foreign!r}, which benchmark {bench.get('name')} "
                                  f"(fingerprint {fp}) does not have: use another directory (hydra.run.dir=...)")


def benchmark_config(cfg: Any) -> dict:
    """cfg.benchmark as a dict. A benchmark whose path is required but unset (`path: ???`, e.g.
    benchmark=humaneval_heldout) takes the held-out split recorded in the adapter's lineage.json:
    `evaluate.py adapter=<finetune run>/adapter benchmark=humaneval_heldout` scores the adapter
    on the problems its training run held out."""
    from omegaconf import OmegaConf
    if not OmegaConf.is_missing(cfg.benchmark, "path"):
        return OmegaConf.to_container(cfg.benchmark, resolve=True)
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True, throw_on_missing=False)
    if not str(bench.get("name") or "").endswith("_heldout"):
        # only a held-out benchmark is the training run's split; any other needs its own file
        raise ValueError(f"benchmark={bench.get('name')} needs benchmark.path=<file>")
    bench["path"] = heldout_path(cfg.get("adapter"), bench.get("name"))
    return bench


def heldout_path(adapter: str | None, benchmark: str | None = None) -> str:
    """The held-out split in the adapter's lineage; an error naming benchmark.path and the adapter
    when there is none to follow."""
    if not adapter:
        raise ValueError(f"benchmark={benchmark} needs benchmark.path=<file> (e.g. <train run>/heldout.jsonl), "
                         "or adapter=<finetune run>/adapter whose lineage.json names the held-out split")
    held = lineage.heldout_of(adapter)
    if held is None:
        raise ValueError(f"benchmark.path is not set and adapter={adapter} records no held-out split "
                         f"({lineage.lineage_path(adapter)} is missing or has no 'heldout'): pass "
                         f"benchmark.path=<train run>/heldout.jsonl for benchmark={benchmark}")
    if not Path(held).exists():
        raise FileNotFoundError(f"benchmark.path is not set and the held-out split in adapter={adapter}'s "
                                f"lineage ({held}) does not exist: pass benchmark.path=<heldout.jsonl>")
    log.info("benchmark.path=%s: the held-out split in the lineage of adapter=%s", held, adapter)
    return held


def run_passk(cfg: Any) -> dict:
    """task=passk. `cfg` is the composed evaluate config (see conf/evaluate.yaml)."""
    from domino.core.locking import output_lock
    from domino.core.validate import EVALUATE, check_config
    check_config(cfg, EVALUATE, "evaluate")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(output_dir, "evaluate"):  # one run per directory: two would interleave completions
        return _run_passk(cfg, output_dir)


def _run_passk(cfg: Any, output_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from domino.core.generation.params import SamplingParams
    bench = benchmark_config(cfg)
    problems = load_benchmark(**bench)
    check_same_benchmark(output_dir, bench, problems)
    from domino.core import attempt
    attempt.accept(output_dir)  # the run owns output_dir from here: its record and log are written there
    scfg = OmegaConf.to_container(cfg.sampling, resolve=True)
    params = SamplingParams.from_config(scfg)
    ks = list(cfg.k)
    stop_after_solution = cfg.prompt.get("stop_after_solution", True)
    if not isinstance(stop_after_solution, bool):
        raise ValueError(f"prompt.stop_after_solution={stop_after_solution!r}: expected true or false")
    if cfg.samples:
        completions = completions_from_samples(problems, cfg.samples)
        n_min = min(Counter(c["task_id"] for c in completions).values())
        check_ks(ks, n_min)
        provenance = {"model": None, "adapter": None, "samples_file": str(cfg.samples)}
    else:
        from domino.evaluation.generation import generate_completions
        ks = check_ks(ks, int(cfg.n_samples))  # before spending any generation
        engine = cfg.engine if isinstance(cfg.engine, str) else OmegaConf.to_container(cfg.engine, resolve=True)
        completions, provenance = generate_completions(
            problems, OmegaConf.to_container(cfg.backbone, resolve=True), params, int(cfg.n_samples),
            int(cfg.seed), output_dir / "completions.jsonl", engine=engine, adapter=cfg.adapter,
            chat=cfg.prompt.chat, resume=cfg.resume, batch_size=scfg.get("batch_size"), progress=_progress,
            style=str(cfg.prompt.get("style") or "evalplus"),
            stop_after_solution=stop_after_solution)
    provenance["lineage"] = lineage.read(cfg.get("adapter"))  # {} without an adapter or its lineage.json
    sb_cfg = SandboxConfig(**OmegaConf.to_container(cfg.sandbox, resolve=True))
    cache = ExecutionCache(cfg.cache_path)
    sandbox = Sandbox(sb_cfg, cache=cache)
    try:
        per_task = score(problems, completions, sandbox)
    finally:
        cache.close()
    provenance |= {"benchmark": {"name": bench.get("name"), "format": bench["format"],
                                 "path": bench.get("path"),
                                 "fingerprint": benchmark_fingerprint(problems), "tasks": len(problems)},
                   "sandbox": {"isolation": sandbox.isolation, **sb_cfg.fingerprint(),
                               "workers": sb_cfg.workers}, "k": ks}
    summary = write_report(output_dir, problems, per_task, ks, provenance)
    log.info("%s", (output_dir / "summary.md").read_text())
    return summary
