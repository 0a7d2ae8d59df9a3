"""What `study.py` runs: the evidence study, as an ordered list of tasks that each leave a marker.

Tasks, in the order that gives a usable partial result soonest:
1. the learning-rate sweep (seed 0, full length) of every config that owns a sweep;
2. the other seeds of those configs at the picked rate, then the configs that borrow a rate;
3. the final samples of every (config, seed), the prompt baselines, then the curve points' samples;
4. the report (`domino.study.report`).
A task whose marker exists is skipped, so rerunning the same command resumes; an unfinished
training run is started over from scratch (its seed makes it exact), an unfinished sample set
resumes sample by sample (synthesis's own store). Large outputs (checkpoints, synthesis dirs) go
under `study.work_dir`; what is worth committing (compact samples, diagnostics, sweep, timings,
report) goes under `study.dir`.
"""
from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from domino.config import compose
from domino.records import read_jsonl, write_jsonl

log = logging.getLogger(__name__)


@dataclass
class Task:
    name: str
    kind: str                   # train | sample | report
    cost: float                 # relative cost (token passes), for the ETA
    run: Callable[[], Any] = field(repr=False)
    done: Callable[[], bool] = field(repr=False)


def config_method(overrides: list[str]) -> tuple[str, bool]:
    """(objective name, whether it trains sample tokens with the contrastive term) of a trained
    config's overrides; reads the `method=`/`method.lambda=` spelling of results made before the
    objective group existed too."""
    from domino.training.objective import has_sample_tokens
    ov = dict(o.split("=", 1) for o in overrides if "=" in o)
    name = ov.get("objective", ov.get("method", "domino"))
    lam = float(ov.get("objective.lambda", ov.get("method.lambda", 1.0 if name == "domino" else 0.0)))
    return name, has_sample_tokens(int(ov.get("prompt.l", 1)), lam)


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


class Study:
    def __init__(self, cfg: DictConfig):
        s = cfg.study
        self.cfg, self.s = cfg, s
        self.work = Path(s.work_dir)
        self.dir = Path(s.dir)
        self.root = str(cfg.paths.root_dir)
        self.seeds = [int(x) for x in s.seeds]
        self.epochs = int(s.epochs)
        self.points = sorted({int(e) for e in s.export_epochs} | {self.epochs})
        self.timings_path = self.dir / "timings.json"

    # ------------------------------------------------------------------ paths
    def run_dir(self, config: str, seed: int, lr: float) -> Path:
        return self.work / "runs" / config / f"seed{seed}_lr{fmt_lr(lr)}"

    def prompt_path(self, config: str, seed: int, lr: float, epoch: int) -> Path:
        run = self.run_dir(config, seed, lr)
        if epoch == self.epochs:
            return run / "domain_prompt.safetensors"
        return run / "points" / f"epoch_{epoch:03d}" / "domain_prompt.safetensors"

    @staticmethod
    def set_name(config: str, seed: int, epoch: int | None = None) -> str:
        return f"{config}_s{seed}" + (f"_e{epoch}" if epoch is not None else "")

    # ------------------------------------------------------------------ bookkeeping
    def _timings(self) -> dict:
        return json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def _record_time(self, name: str, seconds: float) -> None:
        t = self._timings()
        t[name] = round(seconds, 1)
        self.timings_path.parent.mkdir(parents=True, exist_ok=True)
        self.timings_path.write_text(json.dumps(t, indent=1))

    # ------------------------------------------------------------------ training
    def lr_of(self, config: str) -> float:
        """The picked learning rate of `config` (its own sweep, or the one it borrows)."""
        sweep = json.loads((self.dir / "sweep.json").read_text()) if (self.dir / "sweep.json").exists() else {}
        owner = self.sweep_owner(config)
        if owner not in sweep.get("picked", {}):
            raise RuntimeError(f"the learning-rate sweep of {owner} has not finished")
        return float(sweep["picked"][owner])

    def sweep_owner(self, config: str) -> str:
        borrow = dict(self.s.lr_sweep.get("borrow") or {})
        return borrow.get(config, config)

    def train_overrides(self, config: str, seed: int, lr: float) -> list[str]:
        ratio = float(self.s.lr_sweep.lr_sample_ratio)
        run = self.run_dir(config, seed, lr)
        return [*self.s.common, *self.s.train, *self.s.configs[config], f"seed={seed}",
                f"optim.lr_domain={lr}", f"optim.lr_sample={lr * ratio}", "trainer.max_steps=-1",
                f"trainer.max_epochs={self.epochs}", f"export_epochs=[{','.join(map(str, self.points))}]",
                "diagnostics=true", f"paths.output_dir={run}", f"paths.root_dir={self.root}"]

    def train_task(self, config: str, seed: int, lr_fn: Callable[[], float], n_refs: int, seq: int) -> Task:
        domino = self.is_contrastive(config)
        batch = int(self._train_value("data.batch_size", 4))
        cost = self.epochs * n_refs * seq * 3 * ((batch + 1) if domino else 1)
        name = f"train {config} seed {seed}"

        def done() -> bool:
            try:
                return (self.run_dir(config, seed, lr_fn()) / "study_done.json").exists()
            except RuntimeError:  # its learning rate is not picked yet
                return False

        def run() -> None:
            lr = lr_fn()
            out = self.run_dir(config, seed, lr)
            if out.exists():  # an unfinished run: start over (a seeded run is reproduced exactly)
                shutil.rmtree(out)
            from domino.training.run import train
            t0 = time.perf_counter()
            result = train(compose("train", self.train_overrides(config, seed, lr)))
            dt = time.perf_counter() - t0
            self._collect_diagnostics(config, seed, lr, out)
            (out / "study_done.json").write_text(json.dumps({"metrics": result["metrics"], "seconds": dt}))
            self._record_time(f"{name} lr {fmt_lr(lr)}", dt)

        return Task(name, "train", cost, run, done)

    def _train_value(self, key: str, default: Any) -> Any:
        for o in [*self.s.train, *self.s.common]:
            if o.startswith(key + "="):
                return o.split("=", 1)[1]
        return default

    def is_contrastive(self, config: str) -> bool:
        return config_method(list(self.s.configs[config]))[1]

    def _collect_diagnostics(self, config: str, seed: int, lr: float, run: Path) -> None:
        """<dir>/diagnostics/<config>_s<seed>_lr<lr>.json: the diagnostics at every point plus the
        per-epoch validation NLL and the per-step training terms from the CSV log."""
        diag = read_jsonl(run / "diagnostics.jsonl") if (run / "diagnostics.jsonl").exists() else []
        steps: list[dict] = []
        csv_path = run / "csv" / "metrics.csv"
        if csv_path.exists():
            with open(csv_path) as fh:
                for row in csv.DictReader(fh):
                    kept = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "epoch"
                            and (k.startswith("train/") or k.startswith("val/") or k == "step")}
                    if kept:
                        kept["epoch"] = int(float(row["epoch"])) if row.get("epoch") else None
                        steps.append(kept)
        out = self.dir / "diagnostics" / f"{config}_s{seed}_lr{fmt_lr(lr)}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": config, "seed": seed, "lr_domain": lr,
                                   "lr_sample": lr * float(self.s.lr_sweep.lr_sample_ratio),
                                   "points": diag, "log": steps}, indent=0))

    def pick_lrs(self) -> dict:
        """Lowest final val/nll_dom of the seed-0 sweep runs, per sweep owner; written to sweep.json."""
        table: dict[str, dict[str, float]] = {}
        for config in self.sweep_configs():
            table[config] = {}
            for lr in self.s.lr_sweep["values"]:
                f = self.run_dir(config, self.seeds[0], float(lr)) / "study_done.json"
                table[config][str(float(lr))] = json.loads(f.read_text())["metrics"][self.s.lr_sweep.pick_by]
        picked = {c: float(min(v, key=v.get)) for c, v in table.items()}
        data = {"pick_by": self.s.lr_sweep.pick_by, "seed": self.seeds[0], "values": table, "picked": picked,
                "borrow": dict(self.s.lr_sweep.get("borrow") or {}),
                "lr_sample_ratio": float(self.s.lr_sweep.lr_sample_ratio)}
        (self.dir / "sweep.json").write_text(json.dumps(data, indent=1))
        log.info("learning rates picked by %s: %s", self.s.lr_sweep.pick_by, picked)
        return data

    def sweep_configs(self) -> list[str]:
        borrow = dict(self.s.lr_sweep.get("borrow") or {})
        return [c for c in self.s.configs if c not in borrow]

    # ------------------------------------------------------------------ sampling
    def sample_task(self, set_name: str, n: int, overrides: Callable[[], list[str]], seq: int,
                    meta: dict) -> Task:
        out = self.work / "synth" / set_name
        compact = self.dir / "samples" / f"{set_name}.jsonl"

        def done() -> bool:
            return compact.exists()

        def run() -> None:
            from domino.synthesis.run import sample
            t0 = time.perf_counter()
            cfg = compose("synthesize", [*self.s.common, *self.s.synthesize, *overrides(), f"n={n}",
                                         f"output_dir={out}", "progress=false", f"paths.output_dir={out}",
                                         f"paths.root_dir={self.root}"])
            res = sample(cfg)
            recs = read_jsonl(res["samples"])
            keep = [{"id": r["id"], "text": r["text"], "finish_reason": r.get("finish_reason"),
                     "n_tokens": r.get("n_tokens"), "index": r["source"]["index"], "seed": r["source"]["seed"],
                     **meta} for r in recs]
            keep.sort(key=lambda r: r["index"])
            compact.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(compact.with_suffix(".tmp"), keep[:n])
            compact.with_suffix(".tmp").replace(compact)
            self._record_time(f"sample {set_name}", time.perf_counter() - t0)

        # decoding a token costs about what 3 training token passes do here (measured on the CPU)
        return Task(f"sample {set_name} (n={n})", "sample", 3 * n * seq, run, done)

    # ------------------------------------------------------------------ the plan
    def write_data(self, run: Path) -> None:
        """<dir>/data/{references,heldout}.jsonl: the split every run trained on, each text cut to the
        data.max_len tokens the model saw (samples are capped at the same length)."""
        data = self.dir / "data"
        if (data / "heldout.jsonl").exists():
            return
        from domino.backbone import load_backbone
        bcfg = compose("train", [*self.s.common, f"paths.output_dir={run}", f"paths.root_dir={self.root}"]).backbone
        tok = load_backbone(**OmegaConf.to_container(bcfg, resolve=True)).tokenizer
        max_len = int(self._train_value("data.max_len", 256))
        data.mkdir(parents=True, exist_ok=True)
        for name in ("references", "heldout"):
            recs = read_jsonl(run / f"{name}.jsonl")
            ids = tok([r["text"] for r in recs], add_special_tokens=False)["input_ids"]
            out = [{"id": r["id"], "text": tok.decode(i[:max_len]), "n_tokens_original": len(i)}
                   for r, i in zip(recs, ids)]
            write_jsonl(data / f"{name}.jsonl", out)

    def tasks(self) -> list[Task]:
        s = self.s
        n_refs = int(self._train_value("domain.n_references", 40))
        seq = int(self._train_value("data.max_len", 256))
        new = int(next((o.split("=", 1)[1] for o in s.synthesize if o.startswith("sampling.max_new_tokens=")), 64))
        tasks: list[Task] = []
        seed0 = self.seeds[0]
        sweep_cfgs = self.sweep_configs()
        for config in sweep_cfgs:
            for lr in s.lr_sweep["values"]:
                tasks.append(self.train_task(config, seed0, lambda lr=float(lr): lr, n_refs, seq))
        tasks.append(Task("pick learning rates", "pick", 0.0, self.pick_lrs,
                          lambda: (self.dir / "sweep.json").exists()))
        borrowers = [c for c in s.configs if c not in sweep_cfgs]
        n_final, n_curve = int(s.samples.final), int(s.samples.curve)

        def trained(config: str, seed: int, epoch: int):
            def ov() -> list[str]:
                return [f"seed={seed}",
                        f"ckpt={self.prompt_path(config, seed, self.lr_of(config), epoch)}"]
            return ov

        # per group (the configs with their own sweep, then those that borrow a rate): train, sample
        # the final point, (after the first group: the baselines,) then the curve points; so the main
        # comparison, curves included, is complete as early as possible
        for group in (sweep_cfgs, borrowers):
            for config in group:
                for seed in (self.seeds[1:] if config in sweep_cfgs else self.seeds):
                    tasks.append(self.train_task(config, seed, lambda c=config: self.lr_of(c), n_refs, seq))
            for config in group:
                for seed in self.seeds:
                    tasks.append(self.sample_task(self.set_name(config, seed, self.epochs), n_final,
                                                  trained(config, seed, self.epochs), new,
                                                  {"config": config, "epoch": self.epochs, "train_seed": seed}))
            if group is sweep_cfgs:
                for b in s.baselines:
                    tasks.append(self.sample_task(self.set_name(b, int(s.baseline_seed)), n_final,
                                                  lambda b=b: [f"method={b}", f"seed={int(s.baseline_seed)}"], new,
                                                  {"config": b, "epoch": None, "train_seed": None}))
            for config in group:
                for epoch in self.points:
                    if epoch == self.epochs:
                        continue  # the curve's last point is the first n_curve of the final samples
                    for seed in self.seeds:
                        tasks.append(self.sample_task(self.set_name(config, seed, epoch), n_curve,
                                                      trained(config, seed, epoch), new,
                                                      {"config": config, "epoch": epoch, "train_seed": seed}))
        return tasks

    def run(self, progress: bool = True) -> dict[str, Any]:
        from domino.study.progress import StudyProgress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.dir / "study_config.yaml").write_text(OmegaConf.to_yaml(self.s, resolve=True))
        tasks = self.tasks()
        done_before = [t.done() for t in tasks]
        executed: list[str] = []
        t_start = time.perf_counter()
        with StudyProgress(sum(t.cost for t in tasks), enabled=progress) as bar:
            for t, was_done in zip(tasks, done_before):
                if was_done or t.done():
                    bar.skip(t.cost, t.name)
                    continue
                bar.start(t.name)
                t.run()
                executed.append(t.name)
                bar.advance(t.cost)
                if t.kind == "train" and not (self.dir / "data" / "heldout.jsonl").exists():
                    self.write_data(next(p.parent for p in (self.work / "runs").rglob("study_done.json")))
        from domino.study.report import write_report
        t0 = time.perf_counter()
        report = write_report(self.dir, self.s)
        self._record_time("report", time.perf_counter() - t0)
        log.info("study: %d tasks run, %d already done, %.0f s; report: %s", len(executed),
                 sum(done_before), time.perf_counter() - t_start, self.dir / "report.md")
        return {"executed": executed, "skipped": sum(done_before), "report": report, "dir": str(self.dir)}


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.get("stage") or "all"
    if stage == "all":
        return Study(cfg).run(progress=bool(cfg.get("progress", True)))
    if stage == "report":
        from domino.study.report import write_report
        return {"report": write_report(Path(cfg.study.dir), cfg.study), "dir": str(cfg.study.dir)}
    raise ValueError(f"stage={stage!r} is not one of ('all', 'report')")
