"""The stage table: every stage of the pipeline, named once.

The CLI (`domino <stage>`), the entry scripts (train.py, ...), the Python API (domino.api), the
study and the tests read `STAGES`; no other module keeps a list of stages. Each entry names the
stage's top config in conf/, its config schema (domino.core.validate), the runner that does the
work and the outputs it reports. Every stage runs the same way: its runner checks the config, takes
the output directory's lock, works, writes lineage.json; `Stage.run` then returns one shape,

    {"output_dir": str, "artifacts": {name: path}, "metrics": {name: number}}

This is the one module that imports more than one stage's runner (lazily, when a stage runs); the
stage packages themselves never import each other's runners (tests/test_structure.py).
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from domino.core import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    config: str                      # its top config, conf/<config>.yaml (and <config>.py at the root)
    help: str                        # one line, for `domino --help`
    runner: str                      # "module:function" taking the composed config
    schema: Mapping[str, validate.Num] = field(default_factory=dict)
    # name -> file name in output_dir (None: only what the runner returns): reported when the runner
    # returns the name, else when that file exists in output_dir
    artifacts: Mapping[str, str | None] = field(default_factory=dict)

    def load(self) -> Callable[[Any], dict]:
        module, fn = self.runner.split(":")
        return getattr(importlib.import_module(module), fn)

    def run(self, cfg) -> dict[str, Any]:
        """Run the stage on its composed config: {"output_dir", "artifacts", "metrics"}. Its schema is
        checked before anything is loaded (the runner checks it again when called on its own)."""
        validate.check_config(cfg, self.schema, self.name)
        return self.result(self.load()(cfg), cfg)

    def result(self, raw: dict[str, Any], cfg=None) -> dict[str, Any]:
        """The runner's own dict in the table's shape: artifacts are the names of `artifacts` the
        runner returned (a name it does not return: its file, if it exists in output_dir); metrics
        are its `metrics` plus every top-level number."""
        out = raw.get("output_dir") or _output_dir(cfg)
        arts: dict[str, str] = {}
        for key, filename in self.artifacts.items():
            value = raw.get(key)  # a runner that returns the name with None produced none
            if key not in raw and out and filename and (Path(out) / filename).exists():
                value = str(Path(out) / filename)
            if value is not None:
                arts[key] = str(value)
        metrics = {k: v for k, v in raw.items() if _is_number(v)}
        metrics.update(raw.get("metrics") or {})
        return {"output_dir": str(out) if out else None, "artifacts": arts, "metrics": metrics}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _output_dir(cfg) -> str | None:
    if cfg is None:
        return None
    paths = cfg.get("paths") or {}
    return cfg.get("output_dir") or paths.get("output_dir")


# what the curation runner returns (a sample-only run leaves an earlier curation's files unreported)
CURATION = {"curated": None, "sft": None, "report_md": None, "report_json": None}

STAGES: dict[str, Stage] = {s.name: s for s in [
    Stage("train", "train", "learn the domain tokens from reference examples",
          "domino.training.run:train", validate.TRAIN,
          {"domain_prompt": "domain_prompt.safetensors", "references": "references.jsonl",
           "heldout": "heldout.jsonl", "lineage": "lineage.json"}),
    Stage("synthesize", "synthesize", "sample new examples (curate=true: then curate them)",
          "domino.stages:synthesize", validate.SYNTHESIZE,
          {"samples": None, **CURATION, "lineage": "lineage.json"}),
    Stage("curate", "curate", "filter samples, write responses and the SFT set (samples=<file>)",
          "domino.curation.run:curate", validate.CURATE, {**CURATION, "lineage": "lineage.json"}),
    Stage("finetune", "finetune", "fit a LoRA adapter on an SFT set (data=<file>)",
          "domino.finetune.run:finetune", validate.FINETUNE, {"adapter": None, "merged": None}),
    Stage("evaluate", "evaluate", "pass@k on a code benchmark (task=data_quality: the data-quality report)",
          "domino.stages:evaluate", validate.EVALUATE,
          {"completions": "completions.jsonl", "results": "results.jsonl", "summary": "summary.json",
           "summary_md": "summary.md", "report": "data_quality.json", "report_md": "data_quality.md"}),
    Stage("data_quality", "data_quality", "diversity, alignment and memorisation of sample sets (samples={name: file})",
          "domino.data_quality.run:run_data_quality", validate.DATA_QUALITY,
          {"report": "data_quality.json", "report_md": "data_quality.md", "per_sample": "data_quality_samples.jsonl"}),
    Stage("study", "study", "the evidence study (seeded comparison with intervals)",
          "domino.study.run:run", {},
          {"report_md": "report.md", "report_json": "study.json", "loop_report_md": "loop_report.md",
           "loop_report_json": "loop_report.json"}),
]}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: one of {list(STAGES)}")
    return STAGES[name]


def run(name: str, cfg) -> dict[str, Any]:
    """Run stage `name` on its composed config; the table's result shape."""
    return stage(name).run(cfg)


# ------------------------------------------------------------------ runners that span two stages
SYNTHESIZE_STEPS = ("sample", "curate")
EVALUATE_TASKS = ("passk", "data_quality")


def synthesize(cfg) -> dict[str, Any]:
    """`stage=sample` samples, then curates the samples when `curate=true`; `stage=curate` (the older
    spelling of the curate stage) curates an existing samples file (`samples=`)."""
    step = cfg.get("stage") or "sample"
    if step not in SYNTHESIZE_STEPS:
        raise ValueError(f"stage={step!r} is not one of {list(SYNTHESIZE_STEPS)}")
    if step == "curate":
        return _curate(cfg)
    from domino.synthesis.run import sample
    if not cfg.get("curate"):
        return sample(cfg)
    validate.check_config(cfg, validate.CURATE, "curate")  # before sampling, not after it
    # sample, then curate into the same directory under one lock: no other writer gets in between
    from domino.core.locking import output_lock
    with output_lock(cfg.get("output_dir") or cfg.paths.output_dir, "synthesize"):
        result = sample(cfg)
        curated = _curate(cfg, result["samples"])
    return {**result, **{k: v for k, v in curated.items() if k not in ("output_dir", "n")}}


def _curate(cfg, samples: str | None = None) -> dict[str, Any]:
    from domino.curation.run import curate
    return curate(cfg, samples)


def evaluate(cfg) -> dict[str, Any]:
    """`task=passk` (benchmark pass@k) or `task=data_quality` (the older spelling of the data_quality stage)."""
    task = cfg.get("task")
    if task == "passk":
        from domino.evaluation.run import run_passk
        return run_passk(cfg)
    if task == "data_quality":
        from domino.data_quality.run import run_data_quality
        return run_data_quality(cfg)
    raise ValueError(f"task={task!r}: expected one of {list(EVALUATE_TASKS)}")
