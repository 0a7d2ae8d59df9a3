"""What `study.py` runs: the evidence study, as an ordered list of tasks that each leave a marker.

Tasks, in the order that gives a usable partial result soonest:
1. the learning-rate sweep (seed 0, full length) of every config that owns a sweep;
2. the other seeds of those configs at the picked rate, then the configs that borrow a rate (a
   config with one learning rate, the released recipe, waits for no sweep);
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
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from domino.core.config import compose
from domino.core.domain_prompt import EXPORT, META
from domino.core.lineage import FILE
from domino.core.records import publish_files, read_jsonl, write_jsonl, write_text_atomic
from domino.study.tasks import Task, _nothing, schedule

log = logging.getLogger(__name__)


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
    def run_dir(self, config: str, seed: int, lr: float | tuple[float, float]) -> Path:
        return self.work / "runs" / config / f"seed{seed}_{self.lr_tag(lr)}"

    def run_tag(self, config: str, seed: int, lr: float | tuple[float, float]) -> str:
        """<config>_s<seed>_<lr tag>: the name of a run's committed record and of its committed D."""
        return f"{config}_s{seed}_{self.lr_tag(lr)}"

    def lr_tag(self, lr: float | tuple[float, float]) -> str:
        """lr<lr_domain>, plus _ls<lr_sample> where lr_sample is not the default ratio x lr_domain."""
        lr_d, lr_s = lr if isinstance(lr, tuple) else (lr, lr * self.default_ratio)
        tag = f"lr{fmt_lr(lr_d)}"
        return tag if abs(lr_s - lr_d * self.default_ratio) <= 1e-12 * max(1.0, lr_s) else f"{tag}_ls{fmt_lr(lr_s)}"

    @property
    def default_ratio(self) -> float:
        return float(self.s.lr_sweep.lr_sample_ratio)

    @property
    def sweep_separate(self) -> bool:
        """Sweep runs apart from the result runs (`lr_sweep.seed` or `lr_sweep.epochs` set): no
        result seed is one the sweep picked on. Otherwise the winning seed-0 run is reused."""
        sw = self.s.lr_sweep
        return sw.get("seed") is not None or sw.get("epochs") is not None

    @property
    def sweep_epochs(self) -> int:
        return int(self.s.lr_sweep.get("epochs") or self.epochs)

    def sweep_seed(self, config: str) -> int:
        sw = self.s.lr_sweep
        return int(sw.seed) if sw.get("seed") is not None else self.seeds_of(config)[0]

    def sweep_dir(self, config: str, seed: int, lr: tuple[float, float]) -> Path:
        return self.work / "sweep" / config / f"seed{seed}_{self.lr_tag(lr)}"

    def prompt_path(self, config: str, seed: int, lr: float | tuple[float, float], epoch: int,
                    committed: bool = False) -> Path:
        """The domain prompt D a run exported after `epoch`: in the run's work dir, or (`committed`)
        its copy under <dir>/prompts/, which a new machine samples from without training again."""
        if committed:
            return self.dir / "prompts" / self.run_tag(config, seed, lr) / f"epoch_{epoch:03d}" / EXPORT
        run = self.run_dir(config, seed, lr)
        if epoch == self.epochs:
            return run / EXPORT
        return run / "points" / f"epoch_{epoch:03d}" / EXPORT

    def sampling_prompt(self, config: str, seed: int, lr: float | tuple[float, float], epoch: int) -> Path:
        """What a sample set reads: the committed copy of D where there is one, else the work dir's."""
        kept = self.prompt_path(config, seed, lr, epoch, committed=True)
        return kept if kept.exists() else self.prompt_path(config, seed, lr, epoch)

    def commit_prompts(self, config: str, seed: int, lr: tuple[float, float]) -> None:
        """Copy D at every export point, with its metadata and lineage, under <dir>/prompts/ (D alone:
        k x hidden fp32, 115 KB for k = 32 on the 0.5B; the S_i and checkpoints stay in the work dir),
        each point's directory whole or not at all (a point's export has no lineage file of its own)."""
        for epoch in self.points:
            src = self.prompt_path(config, seed, lr, epoch).parent
            publish_files(src, self.prompt_path(config, seed, lr, epoch, committed=True).parent,
                          [n for n in (FILE, EXPORT, META) if (src / n).exists()])

    def prompts_committed(self, config: str, seed: int, lr: tuple[float, float]) -> bool:
        return all(self.prompt_path(config, seed, lr, e, committed=True).with_name(META).exists()
                   for e in self.points)

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
        write_text_atomic(self.timings_path, json.dumps(t, indent=1))

    # ------------------------------------------------------------------ training
    def lr_of(self, config: str) -> tuple[float, float]:
        """The picked (lr_domain, lr_sample) of `config` (its own sweep, or the one it borrows)."""
        owner = self.sweep_owner(config)
        if not self.needs_pick(config):  # one point (the released recipe): nothing to wait for
            return self.grid(owner)[0]
        sweep = json.loads((self.dir / "sweep.json").read_text()) if (self.dir / "sweep.json").exists() else {}
        if owner not in sweep.get("picked", {}):
            raise RuntimeError(f"the learning-rate sweep of {owner} has not finished")
        lr = float(sweep["picked"][owner])
        return lr, float((sweep.get("picked_sample") or {}).get(owner, lr * self.default_ratio))

    def needs_pick(self, config: str) -> bool:
        """Whether `config`'s learning rate comes from a sweep (its owner's grid has several points).
        A one-point grid is known before any run, so its training waits for no sweep."""
        return len(self.grid(self.sweep_owner(config))) > 1

    def grid(self, config: str) -> list[tuple[float, float]]:
        """(lr_domain, lr_sample) points of `config`'s sweep: `lr_sweep.values` x `sample_ratios`
        (default [lr_sample_ratio]), or the config's own entry of `lr_sweep.grid`. A config without
        sample tokens has one point per value (its ratio is irrelevant)."""
        sw = self.s.lr_sweep
        own = dict((sw.get("grid") or {}).get(config) or {})
        values = [float(v) for v in own.get("values", sw["values"])]
        ratios = [float(r) for r in own.get("sample_ratios", sw.get("sample_ratios") or [self.default_ratio])]
        if not self.is_contrastive(config):
            ratios = ratios[:1]
        return [(v, v * r) for v in values for r in ratios]

    def seeds_of(self, config: str) -> list[int]:
        """`study.seeds`, or the config's own list in `study.config_seeds`."""
        own = (self.s.get("config_seeds") or {}).get(config)
        return [int(x) for x in own] if own is not None else self.seeds

    def sweep_owner(self, config: str) -> str:
        borrow = dict(self.s.lr_sweep.get("borrow") or {})
        return borrow.get(config, config)

    def train_overrides(self, config: str, seed: int, lr: tuple[float, float], run: Path | None = None,
                        epochs: int | None = None, points: list[int] | None = None) -> list[str]:
        run = run or self.run_dir(config, seed, lr)
        epochs, points = epochs or self.epochs, points or self.points
        return [*self.s.common, *self.s.train, *self.s.configs[config], f"seed={seed}",
                f"optim.lr_domain={lr[0]}", f"optim.lr_sample={lr[1]}", "trainer.max_steps=-1",
                f"trainer.max_epochs={epochs}", f"export_epochs=[{','.join(map(str, points))}]",
                "diagnostics=true", f"paths.output_dir={run}", f"paths.root_dir={self.root}"]

    def train_name(self, config: str, seed: int, lr: tuple[float, float] | None = None,
                   separate: bool = False) -> str:
        """A training task's name: `train <config> seed <seed>`, plus the rate of a sweep point
        (`lr`), named `sweep ...` when the sweep runs apart from the result runs."""
        return f"{'sweep' if separate else 'train'} {config} seed {seed}" + (f" {self.lr_tag(lr)}" if lr else "")

    def train_task(self, config: str, seed: int, lr_fn: Callable[[], tuple[float, float]], n_refs: int,
                   seq: int, sweep_point: bool = False, needs: Callable[[], list[str]] = _nothing) -> Task:
        domino = self.is_contrastive(config)
        batch = int(self._train_value("data.batch_size", 4))
        separate = sweep_point and self.sweep_separate
        epochs = self.sweep_epochs if separate else self.epochs
        cost = epochs * n_refs * seq * 3 * ((batch + 1) if domino else 1)
        name = self.train_name(config, seed, lr_fn() if sweep_point else None, separate)

        def where(lr) -> Path:
            return self.sweep_dir(config, seed, lr) if separate else self.run_dir(config, seed, lr)

        def record(lr) -> Path:  # committed under study.dir, unlike the run itself
            return self.dir / ("sweep" if separate else "diagnostics") / f"{self.run_tag(config, seed, lr)}.json"

        def done() -> bool:
            try:
                lr = lr_fn()
            except RuntimeError:  # its learning rate is not picked yet
                return False
            if (where(lr) / "study_done.json").exists():
                return True
            # another machine (or a cleaned work dir): the run's checkpoints are gone, but its
            # committed record says it finished. Its sample sets read the committed copy of D; a
            # run committed without one (studies before the copy existed) is needed again only
            # while a task that reads it (a sample set) is pending, and then trains again, same seed.
            if not record(lr).exists():
                return False
            return (not separate and self.prompts_committed(config, seed, lr)) or self._consumers_done(name)

        def run() -> None:
            lr = lr_fn()
            out = where(lr)
            if out.exists():  # an unfinished run: start over (a seeded run is reproduced exactly)
                shutil.rmtree(out)
            from domino.stages import run as run_stage
            t0 = time.perf_counter()
            ov = self.train_overrides(config, seed, lr, run=out, epochs=epochs,
                                      points=[epochs] if separate else None)
            result = run_stage("train", compose("train", ov))
            dt = time.perf_counter() - t0
            if not separate:
                self.commit_prompts(config, seed, lr)
            self._collect_diagnostics(config, seed, lr, out, record(lr))
            write_text_atomic(out / "study_done.json", json.dumps({"metrics": result["metrics"], "seconds": dt}))
            self._record_time(f"{name} {self.lr_tag(lr).replace('_', ' ')}", dt)

        return Task(name, "train", cost, run, done, needs)

    def _train_value(self, key: str, default: Any) -> Any:
        for o in [*self.s.train, *self.s.common]:
            if o.startswith(key + "="):
                return o.split("=", 1)[1]
        return default

    def is_contrastive(self, config: str) -> bool:
        return config_method(list(self.s.configs[config]))[1]

    def _consumers_done(self, name: str) -> bool:
        """Whether every task of this study that needs task `name` is done (False when none does,
        or before `tasks()` has built the list)."""
        users = [t for t in getattr(self, "_tasks", []) if name in t.needs()]
        return bool(users) and all(t.done() for t in users)

    def _collect_diagnostics(self, config: str, seed: int, lr: tuple[float, float], run: Path,
                             out: Path) -> None:
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
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps({"config": config, "seed": seed, "lr_domain": lr[0], "lr_sample": lr[1],
                                           "points": diag, "log": steps}, indent=0))

    def pick_lrs(self) -> dict:
        """Lowest final val/nll_dom of the seed-0 sweep runs, per sweep owner; written to sweep.json
        (`values`: config -> point -> metric, a point named by its lr_domain, or "lr_domain|lr_sample"
        where lr_sample is not the default ratio; `picked`: lr_domain, `picked_sample`: lr_sample)."""
        table: dict[str, dict[str, float]] = {}
        points: dict[str, dict[str, tuple[float, float]]] = {}
        for config in self.sweep_configs():
            table[config], points[config] = {}, {}
            grid = self.grid(config)
            for lr in grid:
                key = str(lr[0]) if self.lr_tag(lr) == self.lr_tag(lr[0]) else f"{lr[0]}|{lr[1]}"
                points[config][key] = lr
                if len(grid) == 1:  # nothing to choose: no sweep run
                    table[config][key] = None
                    continue
                seed = self.sweep_seed(config)
                run = self.sweep_dir(config, seed, lr) if self.sweep_separate else self.run_dir(config, seed, lr)
                table[config][key] = json.loads((run / "study_done.json").read_text())["metrics"][
                    self.s.lr_sweep.pick_by]
        best = {c: min(v, key=lambda k: float("inf") if v[k] is None else v[k]) for c, v in table.items()}
        data = {"pick_by": self.s.lr_sweep.pick_by, "seed": self.sweep_seed(self.sweep_configs()[0]) if
                self.sweep_configs() else None, "epochs": self.sweep_epochs, "values": table,
                "picked": {c: points[c][k][0] for c, k in best.items()},
                "picked_sample": {c: points[c][k][1] for c, k in best.items()},
                "borrow": dict(self.s.lr_sweep.get("borrow") or {}),
                "lr_sample_ratio": self.default_ratio}
        write_text_atomic(self.dir / "sweep.json", json.dumps(data, indent=1))
        log.info("learning rates picked by %s: %s", self.s.lr_sweep.pick_by, {c: points[c][k] for c, k in best.items()})
        return data

    def sweep_configs(self) -> list[str]:
        borrow = dict(self.s.lr_sweep.get("borrow") or {})
        return [c for c in self.s.configs if c not in borrow]

    # ------------------------------------------------------------------ sampling
    def sample_task(self, set_name: str, n: int, overrides: Callable[[], list[str]], seq: int,
                    meta: dict, needs: Callable[[], list[str]] = _nothing) -> Task:
        out = self.work / "synth" / set_name
        compact = self.dir / "samples" / f"{set_name}.jsonl"

        def done() -> bool:
            return compact.exists()

        def run() -> None:
            from domino.stages import run as run_stage
            t0 = time.perf_counter()
            cfg = compose("synthesize", [*self.s.common, *self.s.synthesize, *overrides(), f"n={n}",
                                         f"output_dir={out}", "progress=false", f"paths.output_dir={out}",
                                         f"paths.root_dir={self.root}"])
            recs = read_jsonl(run_stage("synthesize", cfg)["artifacts"]["samples"])
            keep = [{"id": r["id"], "text": r["text"], "finish_reason": r.get("finish_reason"),
                     "n_tokens": r.get("n_tokens"), "index": r["source"]["index"], "seed": r["source"]["seed"],
                     **meta} for r in recs]
            keep.sort(key=lambda r: r["index"])
            compact.parent.mkdir(parents=True, exist_ok=True)
            write_jsonl(compact.with_suffix(".tmp"), keep[:n])
            compact.with_suffix(".tmp").replace(compact)
            self._record_time(f"sample {set_name}", time.perf_counter() - t0)

        # decoding a token costs about what 3 training token passes do here (measured on the CPU)
        return Task(self.sample_task_name(set_name), "sample", 3 * n * seq, run, done, needs)

    @staticmethod
    def sample_task_name(set_name: str) -> str:
        return f"sample {set_name}"

    # ------------------------------------------------------------------ the plan
    def write_data(self, run: Path) -> None:
        """<dir>/data/{references,heldout}.jsonl: the split every run trained on, each text cut to the
        data.max_len tokens the model saw (samples are capped at the same length)."""
        data = self.dir / "data"
        if (data / "heldout.jsonl").exists():
            return
        from domino.core.backbone import load_backbone
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

    def baseline_seeds(self) -> list[int]:
        s = self.s
        return [int(x) for x in s.baseline_seeds] if s.get("baseline_seeds") is not None else [int(s.baseline_seed)]

    def baseline_set(self, method: str, seed: int) -> str:
        # the first baseline seed keeps the name earlier studies used (no seed suffix)
        return method if seed == self.baseline_seeds()[0] else f"{method}_s{seed}"

    def tasks(self) -> list[Task]:
        s = self.s
        n_refs = int(self._train_value("domain.n_references", 40))
        seq = int(self._train_value("data.max_len", 256))
        new = int(next((o.split("=", 1)[1] for o in s.synthesize if o.startswith("sampling.max_new_tokens=")), 64))
        tasks: list[Task] = []
        sweep_cfgs = self.sweep_configs()
        if s.get("pilot"):
            from domino.study.pilot import pilot_tasks
            tasks += pilot_tasks(self, n_refs, seq)
        if s.get("sft"):
            from domino.study.loop import base_tasks
            tasks += base_tasks(self)  # the base model's Pass@1: cheap, and it checks the harness first
        sweep_names = []
        for config in sweep_cfgs:
            grid = self.grid(config)
            for lr in (grid if len(grid) > 1 else []):
                tasks.append(self.train_task(config, self.sweep_seed(config), lambda lr=lr: lr, n_refs, seq,
                                             sweep_point=True))
                sweep_names.append(tasks[-1].name)
        tasks.append(Task("pick learning rates", "pick", 0.0, self.pick_lrs,
                          lambda: (self.dir / "sweep.json").exists(), lambda: list(sweep_names)))

        def picked(config: str):
            return lambda: ["pick learning rates"] if self.needs_pick(config) else []
        borrowers = [c for c in s.configs if c not in sweep_cfgs]
        n_final, n_curve = int(s.samples.final), int(s.samples.curve)

        def trained(config: str, seed: int, epoch: int):
            def ov() -> list[str]:
                return [f"seed={seed}",
                        f"ckpt={self.sampling_prompt(config, seed, self.lr_of(config), epoch)}"]
            return ov

        def reused(config: str, seed: int) -> bool:
            """Whether the sweep's run at this seed is also the result run (the old design)."""
            return (config in sweep_cfgs and len(self.grid(config)) > 1 and not self.sweep_separate
                    and seed == self.sweep_seed(config))

        def after_training(config: str, seed: int):
            def needs() -> list[str]:
                if not reused(config, seed):
                    return picked(config)() + [self.train_name(config, seed)]
                try:  # the winning sweep run is this seed's run: name it once the pick is known
                    return picked(config)() + [self.train_name(config, seed, self.lr_of(config))]
                except RuntimeError:
                    return picked(config)()
            return needs

        # per group (the configs with their own sweep, then those that borrow a rate): train, sample
        # the final point, (after the first group: the baselines,) then the curve points; so the main
        # comparison, curves included, is complete as early as possible
        for group in (sweep_cfgs, borrowers):
            for config in group:
                for seed in [x for x in self.seeds_of(config) if not reused(config, x)]:
                    tasks.append(self.train_task(config, seed, lambda c=config: self.lr_of(c), n_refs, seq,
                                                 needs=picked(config)))
            for config in group:
                for seed in self.seeds_of(config):
                    tasks.append(self.sample_task(self.set_name(config, seed, self.epochs), n_final,
                                                  trained(config, seed, self.epochs), new,
                                                  {"config": config, "epoch": self.epochs, "train_seed": seed},
                                                  after_training(config, seed)))
            if group is sweep_cfgs:
                extra_for = s.get("baseline_extra_seeds_for")
                for b in s.baselines:
                    for bs in self.baseline_seeds():
                        if bs != self.baseline_seeds()[0] and extra_for is not None and b not in extra_for:
                            continue  # later seeds only for the baselines that need them
                        tasks.append(self.sample_task(self.baseline_set(b, bs), n_final,
                                                      lambda b=b, bs=bs: [f"method={b}", f"seed={bs}"], new,
                                                      {"config": b, "epoch": None, "train_seed": None,
                                                       "sample_seed": bs}))
            for config in group:
                for epoch in self.points:
                    if epoch == self.epochs:
                        continue  # the curve's last point is the first n_curve of the final samples
                    for seed in self.seeds_of(config):
                        tasks.append(self.sample_task(self.set_name(config, seed, epoch), n_curve,
                                                      trained(config, seed, epoch), new,
                                                      {"config": config, "epoch": epoch, "train_seed": seed},
                                                      after_training(config, seed)))
        if s.get("sft"):
            from domino.study.loop import loop_tasks
            tasks += loop_tasks(self)
        self._tasks = tasks  # what a train task's done() asks about its consumers
        return tasks

    def run(self, progress: bool = True) -> dict[str, Any]:
        from domino.study.progress import StudyProgress
        self.dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        (self.dir / "study_config.yaml").write_text(OmegaConf.to_yaml(self.s, resolve=True))
        tasks = self.tasks()
        if len({t.name for t in tasks}) != len(tasks):
            raise RuntimeError("study: two tasks share a name")
        done = {t.name for t in tasks if t.done()}
        done_before = len(done)
        executed: list[str] = []
        t_start = time.perf_counter()
        with StudyProgress(sum(t.cost for t in tasks), enabled=progress) as bar:
            for t in tasks:
                if t.name in done:
                    bar.skip(t.cost, t.name)
            while (t := schedule(tasks, done)) is not None:
                if t.done():  # finished by another task meanwhile (a sweep run is also seed 0)
                    done.add(t.name)
                    bar.skip(t.cost, t.name)
                    continue
                bar.start(t.name)
                t.run()
                done.add(t.name)
                executed.append(t.name)
                bar.advance(t.cost)
                if t.kind in ("train", "pilot") and not (self.dir / "data" / "heldout.jsonl").exists():
                    self.write_data(next(p.parent for sub in ("pilot", "sweep", "runs")
                                         for p in (self.work / sub).rglob("heldout.jsonl")))
                self.commit(t.name)
        report = write_reports(self.dir, self.s, self._record_time)
        self.commit("report")
        log.info("study: %d tasks run, %d already done, %.0f s; report: %s", len(executed),
                 done_before, time.perf_counter() - t_start, self.dir / "report.md")
        return {"executed": executed, "n_executed": len(executed), "skipped": done_before, "report": report,
                "dir": str(self.dir), "output_dir": str(self.dir)}

    def commit(self, what: str) -> None:
        """With `study.commit: true`, commit study.dir after each task (only that path), so a
        session that stops, or another machine, continues from the repository. A failed commit
        (another git process holds the index, nothing changed) is logged, never fatal."""
        if not self.s.get("commit"):
            return
        import subprocess
        cwd = self.root
        try:
            subprocess.run(["git", "add", "--", str(self.dir)], cwd=cwd, check=True, capture_output=True, timeout=120)
            r = subprocess.run(["git", "commit", "-q", "-m", f"results/study_{self.s.name}: {what}", "--",
                                str(self.dir)], cwd=cwd, capture_output=True, text=True, timeout=120)
            if r.returncode:
                log.info("study: nothing committed after %s (%s)", what, (r.stdout + r.stderr).strip()[-200:])
        except (subprocess.SubprocessError, OSError) as e:
            log.warning("study: could not commit %s after %s: %s", self.dir, what, e)


def write_reports(study_dir: Path, s: DictConfig, record_time: Callable[[str, float], None] | None = None) -> dict:
    """Part A's report and, for a study with an SFT loop, Part B's (under the key `loop`), from
    study_dir's files alone; `record_time(name, seconds)` gets each one's wall time."""
    from domino.study.report import write_report
    t0 = time.perf_counter()
    report = write_report(study_dir, s)
    if record_time:
        record_time("report", time.perf_counter() - t0)
    if s.get("sft"):
        from domino.study.loop_report import write_loop_report
        t0 = time.perf_counter()
        report["loop"] = write_loop_report(study_dir, s)
        if record_time:
            record_time("loop report", time.perf_counter() - t0)
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    from domino.core import attempt
    attempt.accept(cfg.paths.output_dir)  # the study's own Hydra run dir: its record and log
    stage = cfg.get("stage") or "all"
    if stage == "all":
        return Study(cfg).run(progress=bool(cfg.get("progress", True)))
    if stage == "report":  # both reports from the committed files alone
        return {"report": write_reports(Path(cfg.study.dir), cfg.study), "dir": str(cfg.study.dir),
                "output_dir": str(cfg.study.dir)}
    raise ValueError(f"stage={stage!r} is not one of ('all', 'report')")
