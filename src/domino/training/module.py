"""The LightningModule: a frozen backbone, the soft prompts, the objective, logging and a
checkpoint that holds only what was trained."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from domino.core.backbone import count_params, load_backbone, params_line
from domino.core.prompts import SoftPrompts
from domino.core.trainer import load_metric_states, save_metric_states
from domino.training import objective as obj

log = logging.getLogger(__name__)
BACKBONE_PREFIX = "backbone."
TERMS = ("loss", "loss_dom", "loss_con", "contrast_gap", "nll_pos")  # what objective.combine returns
# what each config group of conf/train.yaml holds, with the defaults a bare DominoModule(...) gets:
# equal to the YAML's (conf/train.yaml, conf/objective/domino.yaml; tests/test_configs.py checks it)
OBJECTIVE = {"name": "domino", "lambda": 1.0, "w_dom": 1.0, "form": "paper", "beta": 1.0, "impl": "efficient",
             "layout": "auto", "chunk_size": None, "negatives": None, "forward_cost": "auto"}
PROMPT = {"k": 8, "l": 8, "init": "sample_vocab", "init_text": None, "domain_head": False,
          "domain_head_hidden": 256, "sample_rank": None}
OPTIM = {"lr_domain": 3e-3, "lr_sample": 3e-3, "weight_decay": 0.0, "warmup_steps": 2}


def nll_fn(impl: str):
    """The function computing (l(x|D), l_ij) for `objective.impl`."""
    if impl == "straightforward":
        return obj.straightforward_nll
    if impl == "efficient":
        from domino.training.objective_cached import cached_nll  # the prefix-cached path (training speed issue)
        return cached_nll
    raise ValueError(f"objective.impl={impl!r} is not one of ('straightforward', 'efficient')")


def _merged(group: str, defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{group}.{k}' for k in unknown)}; "
                         f"{group} takes {sorted(defaults)}")
    return {**defaults, **given}


def check_references(ckpt_meta: dict, fingerprint: str | None, path: str | Path | None = None) -> None:
    """Refuse to resume sample tokens S_i trained on another reference set: row i would belong to
    another text (and D to another domain)."""
    had = ckpt_meta.get("reference_fingerprint")
    if had and fingerprint and had != fingerprint:
        where = f"{path}: " if path else ""
        raise ValueError(f"{where}checkpoint was trained on reference set {had}, this run's references are "
                         f"{fingerprint}: resume with the same domain config (domain.path, n_references, "
                         "split_seed, ...) or start a new run without ckpt_path")


class DominoModule(L.LightningModule):
    """`objective`, `prompt`, `optim`: the config groups of conf/train.yaml (missing keys take the
    defaults above). Whether the run has sample tokens follows from them: prompt.l > 0 and
    objective.lambda > 0 (obj.has_sample_tokens)."""

    def __init__(self, backbone: dict[str, Any], n_references: int, objective: dict[str, Any] | None = None,
                 prompt: dict[str, Any] | None = None, optim: dict[str, Any] | None = None, seed: int = 0):
        super().__init__()
        objective = _merged("objective", OBJECTIVE, objective)
        prompt = _merged("prompt", PROMPT, prompt)
        optim = _merged("optim", OPTIM, optim)
        if objective["form"] not in obj.FORMS:
            raise ValueError(f"objective.form={objective['form']!r} is not one of {obj.FORMS}")
        from domino.core.batching import check_forward_cost
        from domino.training.objective_cached import check_layout
        check_layout(objective["layout"])
        check_forward_cost(objective["forward_cost"], "objective.forward_cost")
        self.with_samples = obj.has_sample_tokens(prompt["l"], objective["lambda"])
        if self.with_samples and n_references < 2:
            raise ValueError(f"the contrastive objective (prompt.l > 0, objective.lambda > 0) needs at "
                             f"least 2 references, got {n_references}")
        self._nll = nll_fn(objective["impl"])
        # the checkpoint never holds the frozen backbone; on_load_checkpoint checks the keys itself, and
        # DeepSpeed (exclude_frozen_parameters) loads its module state with this flag as `strict`
        self.strict_loading = False
        # only plain config values go into hparams: the checkpoint rebuilds the backbone from them
        self.save_hyperparameters({"backbone": dict(backbone), "n_references": n_references,
                                   "objective": objective, "prompt": prompt, "optim": optim, "seed": seed})
        self.obj, self.prompt_cfg, self.optim_cfg = objective, prompt, optim
        # set by the run (domino.core.domains.reference_fingerprint of its references); stored in checkpoints
        self.reference_fingerprint: str | None = None
        bb = load_backbone(**backbone)
        self.backbone = bb.model
        self.tokenizer = bb.tokenizer
        self.backbone_id, self.backbone_hash = bb.id, bb.model_hash
        init_text = prompt["init_text"]
        text_ids = bb.tokenizer(init_text, add_special_tokens=False)["input_ids"] if init_text else None
        # running means (torchmetrics: summed across DDP ranks before dividing): each loss term over
        # an epoch (train/<term>_epoch, weighted by batch size) and val/nll_dom (token-weighted)
        self.epoch_means = torch.nn.ModuleDict({t: MeanMetric() for t in TERMS})
        self.val_nll = MeanMetric()
        self.prompts = SoftPrompts(bb.embed.weight, n_references=n_references if self.with_samples else 0,
                                   k=prompt["k"], l=prompt["l"] if self.with_samples else 0, init=prompt["init"],
                                   text_ids=text_ids, domain_head=prompt["domain_head"],
                                   domain_head_hidden=prompt["domain_head_hidden"],
                                   sample_rank=prompt["sample_rank"], seed=seed)

    # ------------------------------------------------------------------ parameters & counts
    def param_counts(self) -> dict[str, int]:
        trainable, _ = count_params(self.prompts)
        _, frozen = count_params(self.backbone)
        return {"trainable": trainable, "frozen": frozen}

    def on_fit_start(self) -> None:
        c = self.param_counts()
        rank_zero_info(params_line("domino", c["trainable"], c["frozen"], "soft prompts", self.backbone_id))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: never dropout, whatever Lightning toggles
        return self

    # ------------------------------------------------------------------ forward & steps
    def nll(self, batch: dict, with_samples: bool) -> tuple[obj.NLL, obj.NLL | None]:
        """(l(x|D), the l_ij matrix or None) by the configured `objective.impl`."""
        o = self.obj
        D = self.prompts.domain_tokens()
        S = self.prompts.sample_tokens(batch["index"]) if with_samples else None
        if o["impl"] == "efficient":
            kwargs = {"chunk_size": o["chunk_size"], "negatives": o["negatives"], "layout": o["layout"],
                      "forward_cost": o["forward_cost"]}
            if o["negatives"]:  # negatives drawn from (seed, step), not the global RNG: a resume replays them
                kwargs["generator"] = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        elif o["negatives"]:
            raise ValueError("objective.negatives needs objective.impl=efficient")
        else:
            kwargs = {}
        return self._nll(self.backbone, D, S, batch["input_ids"], batch["attention_mask"], **kwargs)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        o = self.obj
        dom, mat = self.nll(batch, with_samples=self.with_samples)
        return obj.combine(dom, mat, form=o["form"], w_dom=o["w_dom"], lam=o["lambda"] if mat is not None else 0.0,
                           beta=o["beta"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.losses(batch)
        B = batch["input_ids"].shape[0]
        for name, v in out.items():
            self.log(f"train/{name}", v, prog_bar=name in ("loss", "contrast_gap"), batch_size=B)
            self.epoch_means[name].update(v.detach(), B)
            self.log(f"train/{name}_epoch", self.epoch_means[name], on_step=False, on_epoch=True)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        dom, _ = self.nll(batch, with_samples=False)  # the efficient path never builds vocab-sized logits
        # token-weighted over the whole held-out set (all ranks): the batch's mean NLL per token,
        # weighted by its token count, is sum(total) / sum(count) at the end
        count = dom.count.sum()
        if count > 0:
            self.val_nll.update(dom.total.sum() / count, count)
            self.log("val/nll_dom", self.val_nll, prog_bar=True, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        o = self.optim_cfg
        groups = [{"params": self.prompts.domain_parameters(), "lr": o["lr_domain"], "name": "domain"}]
        if self.prompts.sample_parameters():
            groups.append({"params": self.prompts.sample_parameters(), "lr": o["lr_sample"], "name": "sample"})
        opt = torch.optim.AdamW(groups, weight_decay=o["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = min(o["warmup_steps"], total - 1) if total > 1 else 0

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
                                "hidden_size": self.prompts.hidden,
                                "reference_fingerprint": self.reference_fingerprint}
        save_metric_states(self, checkpoint)  # the interrupted epoch's means continue, not restart

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
        check_references(meta, self.reference_fingerprint)
        load_metric_states(self, checkpoint)
        # the frozen backbone was loaded from its own source: hand its tensors back so that the
        # (strict) state-dict load sees every key without the checkpoint ever storing them
        checkpoint["state_dict"].update({BACKBONE_PREFIX + k: v for k, v in self.backbone.state_dict().items()})

    def export_domain_prompt(self, out_dir: str | Path, metadata: dict[str, Any]) -> Path:
        """domain_prompt.safetensors (D only, heads folded) + domain_prompt.json (how to rebuild)."""
        from domino.core.domain_prompt import save_domain_prompt
        hp = self.hparams
        meta = {"backbone_id": self.backbone_id, "backbone_hash": self.backbone_hash,
                "backbone": dict(hp.backbone), "l": self.prompts.l if self.with_samples else 0,
                "method": self.obj["name"], "objective": dict(self.obj), "prompt": dict(self.prompt_cfg),
                "seed": hp.seed, **metadata}
        return save_domain_prompt(out_dir, self.prompts.export_domain(), meta)
