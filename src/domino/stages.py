"""The pipeline's stages and what runs each: the one module that knows more than one stage's runner.

Every entry point (train.py, synthesize.py, finetune.py, evaluate.py) calls one of these with its
composed config. The stage packages themselves never import each other's `run` modules (a test
checks it): what one stage needs from another's output travels through files and their lineage.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SYNTHESIZE_STAGES = ("sample", "curate")
EVALUATE_TASKS = ("passk", "data_quality")


def train(cfg) -> dict[str, Any]:
    from domino.training.run import train as _train
    return _train(cfg)


def synthesize(cfg) -> dict[str, Any]:
    """`stage=sample` samples, then curates the samples when `curate=true`; `stage=curate` curates
    an existing samples file (`samples=`)."""
    stage = cfg.get("stage") or "sample"
    if stage not in SYNTHESIZE_STAGES:
        raise ValueError(f"stage={stage!r} is not one of {list(SYNTHESIZE_STAGES)}")
    if stage == "sample" and cfg.get("curate"):
        # sample, then curate into the same directory under one lock: no other writer gets in between
        from domino.locking import output_lock
        with output_lock(cfg.get("output_dir") or cfg.paths.output_dir, "synthesize"):
            return _synthesize(cfg, stage)
    return _synthesize(cfg, stage)


def _synthesize(cfg, stage: str) -> dict[str, Any]:
    from omegaconf import OmegaConf
    result: dict[str, Any] = {}
    samples = None
    if stage == "sample":
        from domino.synthesis.run import sample
        result = sample(cfg)
        if not cfg.get("curate"):
            return result
        samples = result["samples"]
    from domino.curation.run import curate_from_config
    curated = curate_from_config(OmegaConf.to_container(cfg, resolve=True), samples)
    if curated.get("sft"):
        log.info("curation done: %d SFT records in %s (report: %s)", curated["n_sft"], curated["sft"],
                 curated["report_md"])
    else:  # no responses (curation.responses.enabled=false): curated.jsonl only, the note says why
        log.info("curation done: %s curated records in %s, no SFT export (report: %s)", curated.get("n_curated"),
                 curated["curated"], curated["report_md"])
    if stage == "curate":
        return curated
    return {**result, "curation": curated}


def finetune(cfg) -> dict[str, Any]:
    from domino.finetune.run import finetune as _finetune
    return _finetune(cfg)


def evaluate(cfg) -> dict[str, Any]:
    """`task=passk` (benchmark pass@k) or `task=data_quality` (sample-set report)."""
    task = cfg.get("task")
    if task == "passk":
        from domino.evaluation.run import run_passk
        return run_passk(cfg)
    if task == "data_quality":
        from domino.data_quality.run import run_data_quality
        return run_data_quality(cfg)
    raise ValueError(f"task={task!r}: expected one of {list(EVALUATE_TASKS)}")
