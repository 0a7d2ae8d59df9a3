"""The Lightning Trainer of train.py and finetune.py, built from their config groups: `trainer`,
`logger` (conf/logger: default | csv | tensorboard | wandb | none) and `callbacks`
(conf/callbacks: default | none), each entry instantiated from its `_target_`."""
from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from domino.config import instantiate


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """One object per entry of a logger/callbacks group that has a `_target_` (others: skipped)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks")) + list(extra_callbacks or [])
    extra = {}
    if "enable_checkpointing" not in cfg.trainer:
        # no checkpoint callback configured (callbacks=none) means none: Lightning would add its own
        extra["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)


def last_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback writing last.ckpt, if the `callbacks` group has one."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "save_last", False)), None)
