"""The LoRA SFT LightningModule: a frozen backbone wrapped by peft, a loss on assistant tokens only,
AdamW with linear warmup/decay, and checkpoints that hold only the LoRA tensors."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from domino.core.backbone import count_params, load_backbone, params_line
from domino.core.batching import check_forward_cost, length_groups, resolve_forward_cost
from domino.core.trainer import load_metric_states, save_metric_states
from domino.finetune.data import IGNORE
from domino.finetune.dropout import DROPOUT_DRAWS, use_gap_dropout
from domino.training.objective_cached import token_nll

log = logging.getLogger(__name__)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
CKPT_META = "domino_finetune"


def attention_inputs(batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(attention_mask, position_ids) for the model. Right-padded rows whose tokens sit at positions
    0..n-1 (Collate's unpacked rows) need neither: causal attention never lets a real token see the
    padding after it, and no label falls on the padding, so every labelled position computes what
    it would with the mask. Without a mask transformers hands SDPA its causal flag, which skips the
    masked-out upper triangle instead of applying a (rows x T x T) mask (a LoRA step on the 0.5B in
    bf16 with a padded demo-like batch: bench/README.md). Packed rows keep their position blocks."""
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    if mask is None:
        return mask, pos
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
    at_zero = pos is None or bool(((pos == torch.arange(pos.shape[1], device=pos.device)) | (mask == 0)).all())
    return (None, None) if right_padded and at_zero else (mask, pos)


def forward_groups(batch: dict, cost: float | None) -> list[tuple]:
    """[(rows, n, attention_mask, position_ids)]: the decoder forwards that compute a batch's loss,
    each over `rows` (None: all) cut to their first n columns. A batch that keeps its mask (packed,
    left-padded: `attention_inputs`), or cost None, is one forward. Right-padded rows of different
    lengths go as `length_groups`, each group without padding beyond its longest row: the same
    losses and gradients (up to rounding), fewer tokens. On a CPU a LoRA forward + backward costs
    its tokens plus a fixed 27 (the 0.5B, bf16) to 52 (SmolLM2, fp32) tokens' worth, and a padded
    demo-like batch's step ran 1.19-1.20x faster with 1.7-2.7 GB less peak memory (bench/README.md);
    on a GPU ("auto") the batch stays whole (not measured there)."""
    mask, pos = attention_inputs(batch)
    full = batch.get("attention_mask")
    if mask is not None or full is None or cost is None:
        return [(None, batch["input_ids"].shape[1], mask, pos)]
    lengths = full.sum(1).tolist()
    groups = length_groups(lengths, cost)
    if len(groups) == 1:
        return [(None, max(lengths), None, None)]
    return [(torch.tensor(g, device=full.device), max(lengths[i] for i in g), None, None) for g in groups]


def _take(t: torch.Tensor | None, rows: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return t if t is None else (t if rows is None else t[rows])[:, :n]


class LoRAModule(L.LightningModule):
    def __init__(self, backbone: dict[str, Any], r: int = 16, alpha: float = 32, dropout: float = 0.05,
                 target_modules: Sequence[str] = DEFAULT_TARGETS, bias: str = "none", lr: float = 2e-4,
                 weight_decay: float = 0.0, betas: Sequence[float] = (0.9, 0.999), warmup_steps: int = 10,
                 seed: int = 0, forward_cost: float | str | None = "auto", dropout_draws: str = "gaps"):
        super().__init__()
        check_forward_cost(forward_cost, "sft.forward_cost")
        if dropout_draws not in DROPOUT_DRAWS:
            raise ValueError(f"lora.dropout_draws={dropout_draws!r} is not one of {DROPOUT_DRAWS}")
        from peft import LoraConfig, get_peft_model

        # plain config values only: a checkpoint rebuilds the backbone from them
        self.save_hyperparameters()
        bb = load_backbone(**backbone)
        self.tokenizer = bb.tokenizer
        self.backbone_id, self.backbone_hash = bb.id, bb.model_hash
        self.lora_config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                                      target_modules=list(target_modules), bias=bias)
        # running means (torchmetrics: summed across DDP ranks before dividing), token-weighted
        self.train_loss_epoch, self.val_loss = MeanMetric(), MeanMetric()
        with torch.random.fork_rng(devices=[]):  # LoRA A is randomly initialised: make it a function of seed
            torch.manual_seed(seed)
            self.model = get_peft_model(bb.model, self.lora_config)
        if dropout_draws == "gaps":
            use_gap_dropout(self.model)
        if not self.trainable_keys():
            raise ValueError(f"lora.target_modules={list(target_modules)} matched no module of {bb.id}")

    # ------------------------------------------------------------------ parameters & modes
    def trainable_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def param_counts(self) -> dict[str, int]:
        trainable, frozen = count_params(self.model)
        return {"trainable": trainable, "frozen": frozen}

    def on_fit_start(self) -> None:
        c = self.param_counts()
        rank_zero_info(params_line("finetune", c["trainable"], c["frozen"], f"LoRA r={self.hparams.r}",
                                   self.backbone_id))

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # the frozen base never uses dropout; LoRA's own dropout does
            self.model.eval()
            for name, m in self.model.named_modules():
                if name.endswith("lora_dropout"):
                    m.train()
        return self

    # ------------------------------------------------------------------ forward & loss
    def forward(self, input_ids, attention_mask=None, position_ids=None):
        """Full logits of the adapted model (what evaluate.py's PeftModel computes)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits

    def forward_cost(self) -> float | None:
        """`sft.forward_cost` for the device the module is on (`batching.resolve_forward_cost`)."""
        return resolve_forward_cost(self.hparams.forward_cost, self.device)

    def nll_sum(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed NLL, count) over the assistant tokens of the batch. The LM head runs only on the
        positions that predict a labelled token, through the fused head + cross-entropy of the
        objective (`token_nll`): no (tokens x vocabulary) logits or their fp32 copy and gradient are
        kept, the softmax runs in cache-sized row blocks (at a 150k vocabulary that was 12% of a
        step and most of its memory: bench/README.md). The decoder runs once per `forward_groups`
        group; the head, once over all of them."""
        base = self.model.get_base_model()
        softcap = getattr(base.config, "final_logit_softcapping", None)  # the head is more than a linear layer
        outs, tgts = [], []
        for rows, n, mask, pos in forward_groups(batch, self.forward_cost()):
            # use_cache=False: with a cache transformers skips its packed-sequence (block-diagonal) mask
            kwargs = dict(input_ids=_take(batch["input_ids"], rows, n), attention_mask=_take(mask, rows, n),
                          position_ids=_take(pos, rows, n), use_cache=False)
            targets = _take(batch["labels"], rows, n)[:, 1:]
            sel = targets != IGNORE
            out = self.model(**kwargs).logits if softcap else base.get_decoder()(**kwargs).last_hidden_state
            outs.append(out[:, :-1][sel])
            tgts.append(targets[sel])
        out, targets = (torch.cat(x) if len(x) > 1 else x[0] for x in (outs, tgts))
        count = torch.tensor(targets.numel(), device=targets.device)
        if softcap:
            return F.cross_entropy(out.float(), targets, reduction="sum"), count
        return token_nll(base.get_output_embeddings(), out, targets).sum(), count

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # LoRA dropout masks from (seed, step, batch), not the global RNG stream, which no checkpoint
        # holds: a resumed run draws the masks the uninterrupted one did
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 1_009 + batch_idx)
            total, count = self.nll_sum(batch)
        loss = total / count.clamp(min=1)  # a batch whose replies were all truncated away gives 0
        B = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/tokens", count.float(), reduce_fx="sum", batch_size=B)
        if count > 0:
            self.train_loss_epoch.update(loss.detach(), count)
            self.log("train/loss_epoch", self.train_loss_epoch, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        total, count = self.nll_sum(batch)  # token-weighted over the whole validation set, all ranks
        if count > 0:
            self.val_loss.update(total.detach() / count, count)
            self.log("val/loss", self.val_loss, prog_bar=True, on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        est = self.trainer.estimated_stepping_batches
        total = max(1, int(est)) if est != float("inf") else None  # no max_steps/max_epochs: early stopping ends it
        warm = hp.warmup_steps if total is None else (min(hp.warmup_steps, total - 1) if total > 1 else 0)

        def schedule(step: int) -> float:  # linear warmup, then linear decay to 0 at the last step
            if step < warm:
                return (step + 1) / (warm + 1)
            return 1.0 if total is None else max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints & export
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_keys()
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k not in keep]:
            del sd[key]
        checkpoint[CKPT_META] = {"backbone_id": self.backbone_id, "backbone_hash": self.backbone_hash,
                                 "data_sha256": getattr(self, "data_sha256", None)}
        save_metric_states(self, checkpoint)  # the interrupted epoch's means continue, not restart

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_checkpoint(checkpoint)
        load_metric_states(self, checkpoint)
        # the frozen backbone came from its own source: hand its tensors back so the strict
        # state-dict load sees every key without the checkpoint ever storing them
        sd = checkpoint["state_dict"]
        sd.update({k: v for k, v in self.state_dict().items() if k not in sd})

    def check_checkpoint(self, checkpoint: dict) -> None:
        got, want = set(checkpoint["state_dict"]), self.trainable_keys()
        if got != want:
            raise KeyError(f"checkpoint does not match this LoRA model: missing {sorted(want - got)[:5]}, "
                           f"unexpected {sorted(got - want)[:5]}")
        meta = checkpoint.get(CKPT_META, {})
        if meta.get("backbone_hash") not in (None, self.backbone_hash):
            raise ValueError(f"checkpoint was trained on backbone {meta.get('backbone_id')} "
                             f"(config hash {meta.get('backbone_hash')}), this is {self.backbone_id} "
                             f"({self.backbone_hash})")

    def load_trainable(self, ckpt_path: str | Path) -> None:
        """Load the LoRA tensors of a Lightning checkpoint (e.g. the best one) into this module."""
        from domino.core.trainer import read_checkpoint
        ckpt = read_checkpoint(ckpt_path)  # a damaged file is named
        self.check_checkpoint(ckpt)
        self.load_state_dict(ckpt["state_dict"], strict=False)

    def export_adapter(self, out_dir: str | Path) -> Path:
        """peft's own format: adapter_config.json + adapter_model.safetensors (LoRA tensors only).
        The config names the base model by hub id (the embedded model's is
        HuggingFaceTB/SmolLM2-135M-Instruct), so AutoPeftModelForCausalLM and a hub push work on
        another machine; the local directory the weights came from is kept in `self.base_local`
        (finetune.py records it in domino_finetune.json). The random tiny test model has no hub id."""
        import json

        from domino.core.backbone import hub_id
        out_dir = Path(out_dir)
        self.model.save_pretrained(str(out_dir))
        path = out_dir / "adapter_config.json"
        conf = json.loads(path.read_text())
        self.base_local = conf.get("base_model_name_or_path")
        conf["base_model_name_or_path"] = hub_id(self.hparams.backbone) or self.base_local
        path.write_text(json.dumps(conf, indent=2, sort_keys=True))
        return out_dir

    def export_merged(self, out_dir: str | Path) -> Path:
        """Full weights with the adapter folded in, plus the tokenizer. Consumes the module: the
        LoRA layers are merged into the base weights in place (no second copy of the model)."""
        out_dir = Path(out_dir)
        merged = self.model.merge_and_unload()
        merged.save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        return out_dir
