"""A Lightning callback that writes every training and validation batch's seconds to a JSON file
(training: the step, its rows' token counts, the batch's width, and its time up to the backward
and of the backward), rewritten after each batch, so that a training stage's time can be laid
beside a step bench's:

    PYTHONPATH=bench .venv/bin/python train.py experiment=demo "+callbacks.timer._target_=step_timer.StepTimer" \
        "+callbacks.timer.out=/tmp/steps.json"
"""
from __future__ import annotations

import json
import time

from lightning.pytorch.callbacks import Callback


class StepTimer(Callback):
    def __init__(self, out: str):
        self.out, self.rows = out, []
        self.fit0 = self.t0 = self.t_backward = self.t_after = self.v0 = 0.0

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.out, "w") as fh:
            json.dump(self.rows, fh)

    def on_fit_start(self, trainer, module) -> None:
        self.fit0 = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.t0 = time.perf_counter()

    def on_before_backward(self, trainer, module, loss) -> None:
        self.t_backward = time.perf_counter()

    def on_after_backward(self, trainer, module) -> None:
        self.t_after = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        t = time.perf_counter()
        self._write({"kind": "train", "step": trainer.global_step, "s": t - self.t0,
                     "to_backward": self.t_backward - self.t0, "backward": self.t_after - self.t_backward,
                     "lengths": batch["attention_mask"].sum(1).tolist(), "width": batch["input_ids"].shape[1]})

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.v0 = time.perf_counter()

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._write({"kind": "val", "s": time.perf_counter() - self.v0,
                     "lengths": batch["attention_mask"].sum(1).tolist()})

    def on_train_epoch_end(self, trainer, module) -> None:
        self._write({"kind": "epoch_end", "since_fit_start": time.perf_counter() - self.fit0})

    def on_fit_end(self, trainer, module) -> None:
        self._write({"kind": "fit", "s": time.perf_counter() - self.fit0})
