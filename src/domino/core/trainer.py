"""The Lightning Trainer of train.py and finetune.py, built from their config groups: `trainer`,
`logger` (conf/logger: default | csv | tensorboard | wandb | none) and `callbacks`
(conf/callbacks: default | none), each entry instantiated from its `_target_`.

Crash safety lives here too. Checkpoints go through SafeCheckpointIO: written atomically, with a
digest of their tensors; a write that fails stops training (Lightning 2.6 swallows a
PermissionError during its save), and a load that fails, or finds damaged or non-finite tensors,
names the file. CSVLogger (conf/logger/csv.yaml) keeps the rows of an earlier run in the same directory up to
the step a resumed run starts at (Lightning's CSVLogger deletes them)."""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

from domino.core.config import instantiate
from domino.core.records import recover_torn_tail

log = logging.getLogger(__name__)
DIGEST_KEY = "domino_digest"


def instantiate_group(node: DictConfig | None) -> list[Any]:
    """One object per entry of a logger/callbacks group that has a `_target_` (others: skipped)."""
    if not node:
        return []
    return [instantiate(v) for v in node.values() if v is not None and "_target_" in v]


def build_trainer(cfg: DictConfig, extra_callbacks: list | None = None) -> L.Trainer:
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks")) + list(extra_callbacks or [])
    if not loggers:  # logger=none: a learning-rate monitor has nowhere to write (Lightning would refuse)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    extra = {}
    if "enable_checkpointing" not in cfg.trainer:
        # no checkpoint callback configured (callbacks=none) means none: Lightning would add its own
        extra["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **extra)
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # DeepSpeed writes its own directories
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
    return trainer


def last_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The callback writing last.ckpt, if the `callbacks` group has one."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "save_last", False)), None)


# ---------------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read, naming the file."""


def state_dict_digest(state_dict: dict[str, Any]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict's tensors."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        v = state_dict[k]
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def check_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict:
    """A loaded checkpoint's tensors against the digest stored at save time, and finite."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (a {type(ckpt).__name__}, not a dict)")
    sd = ckpt.get("state_dict")
    if isinstance(sd, dict):
        want = ckpt.get(DIGEST_KEY)
        if want is not None and state_dict_digest(sd) != want:
            raise CheckpointError(f"{path}: its tensors do not match the digest stored when it was written "
                                  f"({want}): the file is damaged")
        bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
               and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{path}: non-finite values (NaN/inf) in {bad[:5]}; resume from an earlier "
                                  "checkpoint")
    return ckpt


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = False) -> dict:
    """torch.load a Lightning checkpoint; every failure names the file (check_checkpoint applied)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        ckpt = torch.load(str(path), map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - re-raised naming the file
        raise CheckpointError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); it is truncated, "
                              "damaged or not a Lightning checkpoint") from e
    return check_checkpoint(ckpt, path)


METRIC_STATES = "domino_metric_states"


def save_metric_states(module: torch.nn.Module, checkpoint: dict) -> None:
    """The running sums of every torchmetrics Metric of `module` (the epoch means): their states
    are not in the state dict (not persistent), so a run resumed mid-epoch would otherwise report
    an epoch mean over only the steps after the resume."""
    from torchmetrics import Metric
    checkpoint[METRIC_STATES] = {
        name: {"update_count": int(m._update_count),
               "states": {k: getattr(m, k).detach().cpu().clone() for k in m._defaults}}
        for name, m in module.named_modules() if isinstance(m, Metric) and name}


def load_metric_states(module: torch.nn.Module, checkpoint: dict) -> None:
    """Restore the running sums of an epoch the checkpoint cut mid-way (a checkpoint at an epoch's
    last batch holds that finished epoch's sums, which the next epoch must not inherit)."""
    from torchmetrics import Metric
    if interrupted_epoch(checkpoint) is None:
        return
    saved = checkpoint.get(METRIC_STATES) or {}
    for name, m in module.named_modules():
        if isinstance(m, Metric) and name in saved:
            for k, v in saved[name]["states"].items():
                setattr(m, k, v.to(getattr(m, k).device))
            m._update_count = saved[name]["update_count"]
            m._computed = None


def interrupted_epoch(ckpt: dict) -> int | None:
    """The epoch a checkpoint cut in the middle (None: it was saved at an epoch's last batch, or
    says nothing): a stopped run logs that epoch's means over the steps it ran, which the resumed
    run replaces with the means over all of them."""
    progress = (((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress") or {})
    if "is_last_batch" not in progress or progress["is_last_batch"]:
        return None
    return ckpt.get("epoch")


def check_budget_left(ckpt: dict, path: str | os.PathLike, trainer_cfg: Any) -> None:
    """Refuse to resume a checkpoint that already reached the run's budget: Lightning would start,
    train nothing, and the run would export (and record) the old weights as if it had trained."""
    if trainer_cfg is None:
        return
    step = int(ckpt.get("global_step", 0))
    max_steps = int(trainer_cfg.get("max_steps") if trainer_cfg.get("max_steps") is not None else -1)
    max_epochs = trainer_cfg.get("max_epochs")
    done = (((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}).get("current", {})
    epochs_done = done.get("completed") if isinstance(done, dict) else None
    if max_steps > 0 and step >= max_steps:
        raise ValueError(f"{path}: this checkpoint is at step {step} and trainer.max_steps={max_steps}: nothing is "
                         "left to train. Raise trainer.max_steps to continue it, or use the run's exported outputs")
    by_epochs = max_steps <= 0 and max_epochs not in (None, -1) and epochs_done is not None
    if by_epochs and int(epochs_done) >= int(max_epochs):
        raise ValueError(f"{path}: this checkpoint has completed {epochs_done} epochs and trainer.max_epochs="
                         f"{max_epochs}: nothing is left to train. Raise trainer.max_epochs to continue it")


class SafeCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that never goes on after a failed write and names the file on a bad read."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint[DIGEST_KEY] = state_dict_digest(checkpoint["state_dict"])
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise CheckpointError(f"cannot write checkpoint {path} ({type(e).__name__}: {e}); training stops "
                                  "here rather than go on with nothing to resume from") from e

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if "://" in str(path):
            return check_checkpoint(super().load_checkpoint(path, map_location, weights_only), path)
        return read_checkpoint(path, map_location, weights_only)


# ---------------------------------------------------------------------------------- logs
class _HistoryWriter(ExperimentWriter):
    """CSV writer that starts from the rows already in metrics.csv (instead of deleting them):
    rows before `start_step` are kept, later ones (the part of a crashed run after its checkpoint,
    which the resumed run redoes) are dropped, and a metric the new run logs again at a kept step
    (validation re-run at resume) replaces the old value. Written on the first save, atomically."""

    def __init__(self, log_dir: str, start_step: int, cut_epoch: int | None = None):
        self._start_step, self._cut_epoch = start_step, cut_epoch
        self._previous: list[dict] | None = None
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if path.is_file():
            recover_torn_tail(path)  # a row cut by a kill would read as a shorter number
            with open(path, newline="") as fh:
                self._previous = list(csv.DictReader(fh))

    def save(self) -> None:
        if self._previous is None or not self.metrics:
            return super().save()
        redone: dict[int, set] = {}
        for m in self.metrics:
            redone.setdefault(int(m["step"]), set()).update(k for k in m if k != "step")
        rows = []
        for r in self._previous:
            try:
                step = int(float(r.get("step") or 0))
            except ValueError:
                continue
            if step >= self._start_step:
                continue
            kept = {k: v for k, v in r.items() if k and v not in ("", None) and k not in redone.get(step, ())}
            if self._cut_epoch is not None and _epoch_of(r) == self._cut_epoch:
                # a partial mean of the interrupted epoch (a stop or pre-emption logs one)
                kept = {k: v for k, v in kept.items() if not (k.endswith("_epoch") or k.startswith("val/"))}
            if set(kept) - {"step", "epoch"}:
                rows.append(kept)
        n_old = len(self._previous)
        self._previous = None
        rows += self.metrics
        self.metrics_keys = sorted(set().union(*rows))
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.metrics_file_path)
        log.info("%s: kept %d of %d earlier rows (steps < %d)", self.metrics_file_path, len(rows) - len(self.metrics),
                 n_old, self._start_step)
        self.metrics = []


def _epoch_of(row: dict) -> int | None:
    try:
        return int(float(row.get("epoch")))
    except (TypeError, ValueError):
        return None


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger (same name, same arguments), except that metrics.csv keeps an earlier
    run's history in the same directory up to `start_step` (set by the stage from the checkpoint it
    resumes; 0 = a fresh run, which replaces the file as Lightning's does) and every row is on disk
    as soon as it is logged."""

    start_step: int = 0
    cut_epoch: int | None = None

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        # every row on disk as soon as it is logged (CSVLogger: every 100): a killed run keeps them
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            if not self._is_rank_zero():
                return super().experiment
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self.start_step, self.cut_epoch)
        return self._experiment

    @staticmethod
    def _is_rank_zero() -> bool:
        from lightning.pytorch.utilities.rank_zero import rank_zero_only
        return getattr(rank_zero_only, "rank", 0) == 0


def resume_logs_at(trainer: L.Trainer, step: int, cut_epoch: int | None = None) -> None:
    """Tell the trainer's history-keeping loggers where the resumed run starts, and which epoch the
    interruption cut (its epoch-level values in the kept rows are dropped: the resumed run logs
    that epoch's means over all of its steps)."""
    for lg in trainer.loggers:
        if isinstance(lg, CSVLogger):
            lg.start_step = int(step)
            lg.cut_epoch = cut_epoch
