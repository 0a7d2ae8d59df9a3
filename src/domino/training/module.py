"""The LightningModule: a frozen backbone, the soft prompts, the objective, logging and a
checkpoint that holds only what was trained."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from domino.backbone import count_params, load_backbone
from domino.training import objective as obj
from domino.training.prompts import SoftPrompts

log = logging.getLogger(__name__)
METHODS = ("domino", "soft_prompt")
BACKBONE_PREFIX = "backbone."


def nll_fn(impl: str):
    """The function computing (l(x|D), l_ij) for `objective.impl`."""
    if impl == "straightforward":
        return obj.straightforward_nll
    if impl == "efficient":
        from domino.training.objective_cached import cached_nll  # the prefix-cached path (training speed issue)
        return cached_nll
    raise ValueError(f"objective.impl={impl!r} is not one of ('straightforward', 'efficient')")


class DominoModule(L.LightningModule):
    def __init__(self, backbone: dict[str, Any], n_references: int, method: str = "domino",
                 form: str = "paper", impl: str = "efficient", chunk_size: int | None = None,
                 negatives: int | None = None,
                 k: int = 8, l: int = 8, init: str = "sample_vocab", init_text: str | None = None,
                 domain_head: bool = False, domain_head_hidden: int = 256, sample_rank: int | None = None,
                 w_dom: float = 1.0, lam: float = 1.0, lr_domain: float = 3e-3, lr_sample: float = 3e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 0, seed: int = 0):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method.name={method!r} is not one of {METHODS}")
        if form not in obj.FORMS:
            raise ValueError(f"objective.form={form!r} is not one of {obj.FORMS}")
        if method == "domino" and n_references < 2:
            raise ValueError(f"method=domino needs at least 2 references, got {n_references}")
        self._nll = nll_fn(impl)
        # the checkpoint never holds the frozen backbone; on_load_checkpoint checks the keys itself, and
        # DeepSpeed (exclude_frozen_parameters) loads its module state with this flag as `strict`
        self.strict_loading = False
        # only plain config values go into hparams: the checkpoint rebuilds the backbone from them
        self.save_hyperparameters()
        bb = load_backbone(**backbone)
        self.backbone = bb.model
        self.tokenizer = bb.tokenizer
        self.backbone_id, self.backbone_hash = bb.id, bb.config_hash
        text_ids = bb.tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else None
        self.prompts = SoftPrompts(bb.embed.weight, n_samples=n_references if method == "domino" else 0,
                                   k=k, l=l if method == "domino" else 0, init=init, text_ids=text_ids,
                                   domain_head=domain_head, domain_head_hidden=domain_head_hidden,
                                   sample_rank=sample_rank, seed=seed)

    # ------------------------------------------------------------------ parameters & counts
    def param_counts(self) -> dict[str, int]:
        trainable, _ = count_params(self.prompts)
        _, frozen = count_params(self.backbone)
        return {"trainable": trainable, "frozen": frozen}

    def on_fit_start(self) -> None:
        c = self.param_counts()
        rank_zero_info(f"domino: trainable {c['trainable']:,} params (soft prompts) | frozen {c['frozen']:,} "
                       f"params (backbone {self.backbone_id}) | "
                       f"{100 * c['trainable'] / max(1, c['trainable'] + c['frozen']):.4f}% trainable")

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout, whatever Lightning toggles
        return self

    # ------------------------------------------------------------------ forward & steps
    def nll(self, batch: dict, with_samples: bool) -> tuple[obj.NLL, obj.NLL | None]:
        """(l(x|D), the l_ij matrix or None) by the configured `objective.impl`."""
        hp = self.hparams
        D = self.prompts.domain_tokens()
        S = self.prompts.sample_tokens(batch["index"]) if with_samples else None
        if hp.impl == "efficient":
            kwargs = {"chunk_size": hp.chunk_size, "negatives": hp.negatives}
        elif hp.negatives:
            raise ValueError("objective.negatives needs objective.impl=efficient")
        else:
            kwargs = {}
        return self._nll(self.backbone, D, S, batch["input_ids"], batch["attention_mask"], **kwargs)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        hp = self.hparams
        dom, mat = self.nll(batch, with_samples=hp.method == "domino")
        return obj.combine(dom, mat, form=hp.form, w_dom=hp.w_dom, lam=hp.lam if mat is not None else 0.0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        B = batch["input_ids"].shape[0]
        for name, v in out.items():
            self.log(f"train/{name}", v, prog_bar=name in ("loss", "contrast_gap"), batch_size=B)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        dom, _ = self.nll(batch, with_samples=False)  # the efficient path never builds vocab-sized logits
        # token-weighted over the whole held-out set: accumulate sums, divide at epoch end
        self._val_sum += dom.total.sum()
        self._val_cnt += dom.count.sum()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device)
        self._val_cnt = torch.zeros((), device=self.device)

    def on_validation_epoch_end(self) -> None:
        if self._val_cnt > 0:
            self.log("val/nll_dom", self._val_sum / self._val_cnt, prog_bar=True, sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": self.prompts.domain_parameters(), "lr": hp.lr_domain, "name": "domain"}]
        if self.prompts.sample_parameters():
            groups.append({"params": self.prompts.sample_parameters(), "lr": hp.lr_sample, "name": "sample"})
        opt = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(hp.warmup_steps, total - 1) if total > 1 else 0

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0 at the last step
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def trainable_keys(self) -> set[str]:
        return {k for k in self.state_dict() if not k.startswith(BACKBONE_PREFIX)}

    def state_dict(self, *args, **kwargs):
        # only the soft tokens are ever saved. DeepSpeed builds its checkpoint from this (not from
        # on_save_checkpoint) and its exclude_frozen_parameters misses tied weights (lm_head.weight
        # of a tied-embedding backbone would otherwise be saved, e.g. 272 MB for Qwen2.5-0.5B)
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if k.startswith(BACKBONE_PREFIX) or f".{BACKBONE_PREFIX}" in k]:
            del sd[key]
        return sd

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith(BACKBONE_PREFIX)]:
            del sd[key]
        checkpoint["domino"] = {"backbone_id": self.backbone_id, "backbone_hash": self.backbone_hash,
                                "hidden_size": self.prompts.hidden}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "state_dict" not in checkpoint:
            # DeepSpeed: the engine has restored the trainable tensors from its own files already;
            # the client state it hands back carries no state_dict
            return
        got, want = set(checkpoint["state_dict"]), self.trainable_keys()
        if got != want:
            raise KeyError(f"checkpoint does not match this model: missing {sorted(want - got)}, "
                           f"unexpected {sorted(got - want)}")
        meta = checkpoint.get("domino", {})
        if meta.get("backbone_hash") not in (None, self.backbone_hash):
            raise ValueError(f"checkpoint was trained on backbone {meta.get('backbone_id')} "
                             f"(config hash {meta.get('backbone_hash')}), this is {self.backbone_id} "
                             f"({self.backbone_hash})")
        # the frozen backbone was loaded from its own source: hand its tensors back so that the
        # (strict) state-dict load sees every key without the checkpoint ever storing them
        checkpoint["state_dict"].update({BACKBONE_PREFIX + k: v for k, v in self.backbone.state_dict().items()})

    def export_domain_prompt(self, out_dir: str | Path, metadata: dict[str, Any]) -> Path:
        """domain_prompt.safetensors (D only, heads folded) + domain_prompt.json (how to rebuild)."""
        from safetensors.torch import save_file
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        D = self.prompts.export_domain()
        path = out_dir / "domain_prompt.safetensors"
        save_file({"domain_tokens": D}, str(path))
        hp = self.hparams
        meta = {"backbone_id": self.backbone_id, "backbone_hash": self.backbone_hash,
                "backbone": dict(hp.backbone), "hidden_size": int(D.shape[1]), "k": int(D.shape[0]),
                "l": hp.l if hp.method == "domino" else 0, "method": hp.method,
                "objective": {"form": hp.form, "w_dom": hp.w_dom, "lambda": hp.lam}, "seed": hp.seed,
                **metadata}
        (out_dir / "domain_prompt.json").write_text(json.dumps(meta, indent=2, default=str))
        return path
