"""The evaluation stage: generate (or read) completions, execute them in the sandbox, report pass@k.

Outputs in `output_dir`: completions.jsonl (when generating), results.jsonl (one line per task),
summary.json and summary.md (pass@k, outcome counts, provenance).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

from domino.evaluation.benchmarks import fingerprint, load_benchmark
from domino.evaluation.generation import SamplingConfig, batch_seed, read_completions
from domino.evaluation.passk import aggregate, check_ks, pass_at_k
from domino.evaluation.prompting import build_prompt, program_from_sample, to_program, use_chat
from domino.evaluation.sandbox import ExecutionCache, Sandbox, SandboxConfig
from domino.records import iter_jsonl

log = logging.getLogger(__name__)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn())


def _gen_key(model_id: str, adapter_fp: str | None, s: SamplingConfig, chat: bool, prompt: str) -> str:
    """What a completion depends on; resumed records are reused only when it matches."""
    blob = json.dumps([model_id, adapter_fp, s.temperature, s.top_p, s.max_new_tokens, s.seed, chat, prompt])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def generate_completions(problems: list[dict], backbone_cfg: dict, sampling: SamplingConfig,
                         out_path: Path, adapter: str | None = None, engine: str = "hf",
                         chat: bool | None = None, resume: str | None = None) -> tuple[list[dict], dict]:
    """Sample `n_samples` outputs per problem, appending each to `out_path` as soon as it exists."""
    from domino.backbone import load_backbone, load_tokenizer
    if engine == "vllm":
        from domino.evaluation.generation import VLLMEngine, adapter_fingerprint
        path = str(backbone_cfg.get("path"))
        if path in ("embedded", "tiny"):
            raise ValueError("engine=vllm needs backbone.path to be a hub id or local HF directory")
        tok = load_tokenizer(path)
        chat = use_chat(tok, chat)
        eng = VLLMEngine(path, sampling, chat, adapter=adapter, dtype=backbone_cfg.get("dtype", "bfloat16"))
        model_id, adapter_fp = path, adapter_fingerprint(Path(adapter)) if adapter else None
    elif engine == "hf":
        import torch

        from domino.evaluation.generation import HFEngine, load_adapter
        bb = load_backbone(**backbone_cfg)
        model, adapter_fp = load_adapter(bb.model, adapter)
        if torch.cuda.is_available():
            model = model.cuda()
        chat = use_chat(bb.tokenizer, chat)
        tok = bb.tokenizer
        eng = HFEngine(model, tok, sampling, chat)
        model_id = bb.id
    else:
        raise ValueError(f"engine={engine!r}: expected hf or vllm")

    prompts = {p["task_id"]: build_prompt(p, tok, chat) for p in problems}
    keys = {t: _gen_key(model_id, adapter_fp, sampling, chat, pr) for t, pr in prompts.items()}
    done: dict[tuple[str, int], dict] = {}
    if resume:
        for rec in read_completions(resume):
            same = keys.get(rec.get("task_id")) == rec.get("gen_key")
            if same and rec.get("sample_idx", 1 << 30) < sampling.n_samples:
                done[(rec["task_id"], rec["sample_idx"])] = rec
        log.info("resume: reusing %d completions from %s", len(done), resume)
    by_id = {p["task_id"]: p for p in problems}
    reused = len(done)
    todo = [(t, i) for t in prompts for i in range(sampling.n_samples) if (t, i) not in done]
    todo.sort(key=lambda ti: len(prompts[ti[0]]))  # similar lengths per batch: less padding
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a") as fh:
        for rec in done.values():
            fh.write(json.dumps(rec) + "\n")
        fh.flush()
        started, n_tok = time.monotonic(), 0
        with _progress() as bar:
            job = bar.add_task("generate", total=len(todo), rate="")
            for b in range(0, len(todo), sampling.batch_size):
                batch = todo[b: b + sampling.batch_size]
                seed = batch_seed(sampling.seed, [f"{t}#{i}" for t, i in batch])
                outs, ntok = eng.generate([prompts[t] for t, _ in batch], seed)
                n_tok += ntok
                for (t, i), text in zip(batch, outs):
                    rec = {"task_id": t, "sample_idx": i, "gen_key": keys[t], "output": text,
                           "program": to_program(by_id[t], text, chat)}
                    done[(t, i)] = rec
                    fh.write(json.dumps(rec) + "\n")
                fh.flush()
                rate = n_tok / max(1e-9, time.monotonic() - started)
                bar.update(job, advance=len(batch), rate=f"{rate:.1f} tok/s")
    provenance = {"model": model_id, "adapter": adapter, "adapter_fingerprint": adapter_fp, "engine": engine,
                  "chat_template": chat, "sampling": vars(sampling), "reused_completions": reused}
    recs = sorted(done.values(), key=lambda r: (r["task_id"], r["sample_idx"]))
    return recs, provenance


def completions_from_samples(problems: list[dict], samples: str) -> list[dict]:
    """`samples=` mode: score an existing JSONL of completions (see prompting.program_from_sample)."""
    by_id = {p["task_id"]: p for p in problems}
    counts: Counter = Counter()
    recs = []
    for lineno, rec in iter_jsonl(samples):  # malformed lines raise RecordError (a ValueError) with file:line
        where = f"{samples}:{lineno}"
        t = str(rec.get("task_id"))
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
    counts = {}
    with open(output_dir / "results.jsonl", "w") as fh:
        for p in problems:
            samples = sorted(per_task.get(p["task_id"], []), key=lambda s: s["sample_idx"])
            n, c = len(samples), sum(s["status"] == "passed" for s in samples)
            counts[p["task_id"]] = (n, c)
            fh.write(json.dumps({"task_id": p["task_id"], "n": n, "c": c,
                                 **{f"pass@{k}": pass_at_k(n, c, k) for k in ks if k <= n},
                                 "samples": samples}) + "\n")
    statuses = Counter(s["status"] for ss in per_task.values() for s in ss)
    summary = {**aggregate(counts, ks), "tasks": len(problems), "samples": sum(statuses.values()),
               "outcomes": dict(sorted(statuses.items())), **provenance}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
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
    (output_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def run_passk(cfg: Any) -> dict:
    """task=passk. `cfg` is the composed evaluate config (see conf/evaluate.yaml)."""
    from omegaconf import OmegaConf
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    bench = OmegaConf.to_container(cfg.benchmark, resolve=True)
    problems = load_benchmark(**bench)
    sampling = SamplingConfig(n_samples=cfg.n_samples, temperature=cfg.sampling.temperature,
                              top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens,
                              batch_size=cfg.sampling.batch_size, seed=cfg.seed)
    ks = list(cfg.k)
    if cfg.samples:
        completions = completions_from_samples(problems, cfg.samples)
        n_min = min(Counter(c["task_id"] for c in completions).values())
        check_ks(ks, n_min)
        provenance = {"model": None, "adapter": None, "samples_file": str(cfg.samples)}
    else:
        ks = check_ks(ks, sampling.n_samples)  # before spending any generation
        completions, provenance = generate_completions(
            problems, OmegaConf.to_container(cfg.backbone, resolve=True), sampling,
            output_dir / "completions.jsonl", adapter=cfg.adapter, engine=cfg.engine, chat=cfg.prompt.chat,
            resume=cfg.resume)
    sb_cfg = SandboxConfig(**OmegaConf.to_container(cfg.sandbox, resolve=True))
    cache = ExecutionCache(cfg.cache_path)
    sandbox = Sandbox(sb_cfg, cache=cache)
    try:
        per_task = score(problems, completions, sandbox)
    finally:
        cache.close()
    provenance |= {"benchmark": {"name": bench.get("name"), "format": bench["format"],
                                 "path": bench.get("path"),
                                 "fingerprint": fingerprint(problems), "tasks": len(problems)},
                   "sandbox": {"isolation": sandbox.isolation, **sb_cfg.fingerprint(),
                               "workers": sb_cfg.workers}, "k": ks}
    summary = write_report(output_dir, problems, per_task, ks, provenance)
    log.info("%s", (output_dir / "summary.md").read_text())
    return summary
