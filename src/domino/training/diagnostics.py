"""Training-curve exports and diagnostics of the mechanism (`export_epochs`, `diagnostics` in train.yaml).

The method's claim is that the sample tokens absorb what is private to each reference, so that D
keeps only what the references share. What shows whether that happens, at init and after chosen
epochs, on the *whole* training set in a fixed order (not the shuffled batches of the step logs):
- `nll_dom_train`: l(x|D) on the training texts; `nll_dom_heldout`: the same on held-out texts
  (the gap between the two is D memorising its references);
- `nll_pos`: l(x_i|D,S_i), a reference under its own sample tokens; `nll_neg`: l(x_j|D,S_i), j != i,
  within the same fixed batches; `contrast_gap` = nll_neg - nll_pos (large = S_i are private);
- `d_drift`: ||D - D_0||_F / ||D_0||_F, how far the domain tokens moved from their init; `s_drift`
  the same for the table of every S_i, and `s_move_max_std`, the largest move of one S coordinate
  in units of the init's std (does an S_i move at all, and how far from its init distribution).
All NLLs are token-weighted means, like `val/nll_dom`. One JSON line per point in
<run>/diagnostics.jsonl; exports of D per epoch in <run>/points/epoch_NNN/.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from domino.core.batching import Collate, IndexedTexts

log = logging.getLogger(__name__)


@torch.no_grad()
def all_sample_tokens(module) -> torch.Tensor | None:
    """Every S_i as one fp32 (n, l, h) tensor, or None without sample tokens."""
    p = module.prompts
    if not p.has_samples:
        return None
    n = p.samples.shape[0] if hasattr(p, "samples") else p.sample_coef.shape[0]
    return p.sample_tokens(torch.arange(n, device=p.domain.device)).detach().float().cpu().clone()


@torch.no_grad()
def measure(module, train_ids: list[list[int]], heldout_ids: list[list[int]], batch_size: int,
            d0: torch.Tensor, s0: torch.Tensor | None = None) -> dict[str, float]:
    """The diagnostics above for `module` (a DominoModule) on tokenised texts."""
    collate = Collate(module.tokenizer.pad_token_id)
    has_samples = module.prompts.has_samples
    keys = ("dom_t", "dom_c", "held_t", "held_c", "pos_t", "pos_c", "neg_t", "neg_c")
    sums = {k: torch.zeros((), dtype=torch.float64) for k in keys}

    def batches(ids: list[list[int]]):
        data = IndexedTexts(ids)
        for s in range(0, len(ids), batch_size):
            b = collate([data[i] for i in range(s, min(s + batch_size, len(ids)))])
            yield {k: v.to(module.device) for k, v in b.items()}

    for b in batches(train_ids):
        with_samples = has_samples and b["input_ids"].shape[0] >= 2
        dom, mat = module.nll(b, with_samples=with_samples)
        sums["dom_t"] += dom.total.sum().double().cpu()
        sums["dom_c"] += dom.count.sum().double().cpu()
        if mat is not None:
            eye = torch.eye(mat.total.shape[0], dtype=torch.bool, device=mat.total.device)
            sums["pos_t"] += mat.total[eye].sum().double().cpu()
            sums["pos_c"] += mat.count[eye].sum().double().cpu()
            sums["neg_t"] += mat.total[~eye].sum().double().cpu()
            sums["neg_c"] += mat.count[~eye].sum().double().cpu()
    for b in batches(heldout_ids):
        dom, _ = module.nll(b, with_samples=False)
        sums["held_t"] += dom.total.sum().double().cpu()
        sums["held_c"] += dom.count.sum().double().cpu()

    def ratio(t: str, c: str) -> float | None:
        return float(sums[t] / sums[c]) if sums[c] > 0 else None

    D = module.prompts.export_domain()
    out = {"nll_dom_train": ratio("dom_t", "dom_c"), "nll_dom_heldout": ratio("held_t", "held_c"),
           "nll_pos": ratio("pos_t", "pos_c"), "nll_neg": ratio("neg_t", "neg_c"),
           "d_drift": float((D - d0).norm() / d0.norm().clamp_min(1e-12)), "d_norm_mean": float(D.norm(dim=1).mean())}
    out["contrast_gap"] = (out["nll_neg"] - out["nll_pos"]) if out["nll_pos"] is not None else None
    S = all_sample_tokens(module)
    if S is not None and s0 is not None:
        out["s_drift"] = float((S - s0).norm() / s0.norm().clamp_min(1e-12))
        out["s_move_max_std"] = float((S - s0).abs().max() / s0.std().clamp_min(1e-12))
    return out


class EpochPoints(L.Callback):
    """Exports D after the chosen epochs and, optionally, writes the diagnostics at init and there."""

    def __init__(self, out_dir: str | Path, export_epochs: list[int], diagnostics: bool,
                 train_ids: list[list[int]], heldout_ids: list[list[int]], batch_size: int,
                 metadata: Callable[[], dict[str, Any]]):
        self.out_dir = Path(out_dir)
        self.epochs = sorted({int(e) for e in export_epochs})
        if any(e < 1 for e in self.epochs):
            raise ValueError(f"export_epochs={self.epochs}: epochs are 1-based (1 = after the first epoch)")
        self.diagnostics, self.train_ids, self.heldout_ids = diagnostics, train_ids, heldout_ids
        self.batch_size, self.metadata = batch_size, metadata
        self.d0: torch.Tensor | None = None
        self.s0: torch.Tensor | None = None

    @property
    def path(self) -> Path:
        return self.out_dir / "diagnostics.jsonl"

    def _record(self, module, epoch: int, step: int) -> None:
        if not self.diagnostics:
            return
        was_training = module.training
        module.eval()
        try:
            row = {"epoch": epoch, "step": step, **measure(module, self.train_ids, self.heldout_ids,
                                                           self.batch_size, self.d0, self.s0)}
        finally:
            module.train(was_training)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("diagnostics at epoch %d: %s", epoch,
                 {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})

    def on_train_start(self, trainer: L.Trainer, module) -> None:
        self.d0 = module.prompts.export_domain().clone()  # export_domain may share the parameter's storage
        self.s0 = all_sample_tokens(module)
        if trainer.is_global_zero and trainer.current_epoch == 0 and trainer.global_step == 0:
            self.path.unlink(missing_ok=True)  # a fresh run; a resumed one appends
            self._record(module, 0, 0)

    def on_train_epoch_end(self, trainer: L.Trainer, module) -> None:
        epoch = trainer.current_epoch + 1
        if epoch not in self.epochs or not trainer.is_global_zero:
            return
        module.export_domain_prompt(self.out_dir / "points" / f"epoch_{epoch:03d}",
                                    {**self.metadata(), "epoch": epoch, "steps": trainer.global_step})
        self._record(module, epoch, trainer.global_step)
