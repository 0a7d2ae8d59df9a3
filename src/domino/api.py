"""The Python API: every stage of the stage table (domino.stages) as a function of config
overrides, no Hydra app needed.

    from domino.api import train, synthesize, curate, finetune, evaluate, data_quality
    run = train(["backbone=tiny", "trainer.max_steps=2"])
    samples = synthesize([f"ckpt={run['artifacts']['domain_prompt']}", "n=8"])
    sft = curate([f"samples={samples['artifacts']['samples']}"])
    adapter = finetune([f"data={sft['artifacts']['sft']}"])
    scores = evaluate([f"adapter={adapter['artifacts']['adapter']}", "benchmark=humaneval_heldout"])
    scores["metrics"]["pass@1"]

Each takes a list of overrides (the command line's `key=value` words) or a composed `config`,
and returns the stage table's one shape: {"output_dir", "artifacts": {name: path}, "metrics":
{name: number}}. Outputs go to a new timestamped directory under `<cwd>/lightning_logs/<stage>/runs/`
unless `output_dir=` is given. (`finetune` is also the name of the package `domino.finetune`, so the
functions live here, not in `domino` itself.)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, open_dict

from domino.stages import STAGES


def compose(stage: str, overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The stage's config as its entry point composes it, with the run directory filled in."""
    from domino.core.config import compose as compose_config
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: one of {list(STAGES)}")
    overrides = list(overrides)
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "paths.root_dir" not in keys and not os.environ.get("DOMINO_ROOT"):
        overrides.append(f"paths.root_dir={Path.cwd()}")
    cfg = compose_config(STAGES[stage].config, overrides)
    if "paths.output_dir" not in keys:
        out = output_dir or cfg.get("output_dir") or (
            Path(cfg.paths.log_dir) / cfg.task_name / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S"))
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            if output_dir is not None and "output_dir" in cfg:  # synthesize/curate write where output_dir says
                cfg.output_dir = str(output_dir)
    return cfg


def run(stage: str, overrides: Sequence[str] | DictConfig | None = None, *, config: DictConfig | None = None,
        output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run any stage of the table: {"output_dir", "artifacts", "metrics"}."""
    if isinstance(overrides, DictConfig):
        config, overrides = overrides, None
    if config is not None and overrides:
        raise ValueError("pass overrides or a config, not both")
    cfg = config if config is not None else compose(stage, overrides or (), output_dir)
    return STAGES[stage].run(cfg)


def _stage_function(name: str):
    def fn(overrides: Sequence[str] | DictConfig | None = None, *, config: DictConfig | None = None,
           output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        return run(name, overrides, config=config, output_dir=output_dir)
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"{STAGES[name].help[:1].upper()}{STAGES[name].help[1:]}: {{'output_dir', 'artifacts', 'metrics'}}."
    return fn


train = _stage_function("train")
synthesize = _stage_function("synthesize")
curate = _stage_function("curate")
finetune = _stage_function("finetune")
evaluate = _stage_function("evaluate")
data_quality = _stage_function("data_quality")
study = _stage_function("study")
