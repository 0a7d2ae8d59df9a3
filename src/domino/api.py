"""The Python API: every stage as a function of config overrides, no Hydra app needed.

    from domino.api import train, synthesize, curate, finetune, evaluate
    run = train(["backbone=tiny", "trainer.max_steps=2"])
    samples = synthesize([f"ckpt={run['domain_prompt']}", "n=8"])
    sft = curate([f"samples={samples['samples']}"])
    adapter = finetune([f"data={sft['sft']}"])
    scores = evaluate([f"adapter={adapter['adapter']}", "benchmark=humaneval_heldout"])

Each takes a list of overrides (the command line's `key=value` words) or a composed `config`,
and returns what the stage produced: paths (`output_dir`, `domain_prompt`, `samples`, `sft`,
`adapter`, ...) and metrics. Outputs go to a new timestamped directory under
`<cwd>/lightning_logs/<stage>/runs/` unless `output_dir=` is given. (`finetune` is also the name
of the package `domino.finetune`, so the functions live here, not in `domino` itself.)
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, open_dict

CONFIG_NAMES = {"train": "train", "synthesize": "synthesize", "curate": "synthesize", "finetune": "finetune",
                "evaluate": "evaluate", "study": "study"}


def compose(stage: str, overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None) -> DictConfig:
    """The stage's config as its entry point composes it, with the run directory filled in."""
    from domino.config import compose as compose_config
    if stage not in CONFIG_NAMES:
        raise ValueError(f"unknown stage {stage!r}: one of {sorted(CONFIG_NAMES)}")
    overrides = list(overrides)
    if stage == "curate" and not any(o.startswith("stage=") for o in overrides):
        overrides.append("stage=curate")
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    if "paths.root_dir" not in keys and not os.environ.get("DOMINO_ROOT"):
        overrides.append(f"paths.root_dir={Path.cwd()}")
    cfg = compose_config(CONFIG_NAMES[stage], overrides)
    if "paths.output_dir" not in keys:
        out = output_dir or cfg.get("output_dir") or (
            Path(cfg.paths.log_dir) / cfg.task_name / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S"))
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            if output_dir is not None and "output_dir" in cfg:  # synthesize/curate write where output_dir says
                cfg.output_dir = str(output_dir)
    return cfg


def _config(stage: str, overrides: Sequence[str] | DictConfig | None, config: DictConfig | None,
            output_dir) -> DictConfig:
    if isinstance(overrides, DictConfig):
        config, overrides = overrides, None
    if config is not None:
        if overrides:
            raise ValueError("pass overrides or a config, not both")
        return config
    return compose(stage, overrides or (), output_dir)


def train(overrides: Sequence[str] | None = None, *, config: DictConfig | None = None,
          output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Learn the domain tokens: {"output_dir", "domain_prompt", "metrics"}."""
    from domino import stages
    return stages.train(_config("train", overrides, config, output_dir))


def synthesize(overrides: Sequence[str] | None = None, *, config: DictConfig | None = None,
               output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Sample (and with `curate=true` curate): {"output_dir", "samples", "n_present", ...}."""
    from domino import stages
    return stages.synthesize(_config("synthesize", overrides, config, output_dir))


def curate(overrides: Sequence[str] | None = None, *, config: DictConfig | None = None,
           output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Curate `samples=<file>`: {"curated", "sft", "n_sft", "report_md", ...}."""
    from domino import stages
    return stages.synthesize(_config("curate", overrides, config, output_dir))


def finetune(overrides: Sequence[str] | None = None, *, config: DictConfig | None = None,
             output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit a LoRA adapter on `data=<sft.jsonl>`: {"output_dir", "adapter", "metrics"}."""
    from domino import stages
    return stages.finetune(_config("finetune", overrides, config, output_dir))


def evaluate(overrides: Sequence[str] | None = None, *, config: DictConfig | None = None,
             output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """pass@k (`task=passk`, default) or the data-quality report (`task=data_quality`)."""
    from domino import stages
    return stages.evaluate(_config("evaluate", overrides, config, output_dir))
