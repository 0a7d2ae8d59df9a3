"""What `train.py` runs: load the domain, write its splits, fit the soft prompts, export D."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from domino.data.domains import fingerprint, load_domain
from domino.provenance import config_hash, git_commit
from domino.records import write_jsonl
from domino.training.datamodule import DomainDataModule
from domino.training.module import DominoModule

log = logging.getLogger(__name__)
# the frozen backbone is in eval mode on purpose (no dropout)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def build_module(cfg: DictConfig, n_references: int) -> DominoModule:
    m, p, o, opt = cfg.method, cfg.prompt, cfg.objective, cfg.optim
    return DominoModule(
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True), n_references=n_references,
        method=m.name, form=o.form, impl=o.impl, chunk_size=o.chunk_size, negatives=o.negatives,
        k=p.k, l=p.l, init=p.init, init_text=p.init_text, domain_head=p.domain_head,
        domain_head_hidden=p.domain_head_hidden, sample_rank=p.sample_rank,
        w_dom=m.w_dom, lam=m["lambda"], lr_domain=opt.lr_domain, lr_sample=opt.lr_sample,
        weight_decay=opt.weight_decay, warmup_steps=opt.warmup_steps, seed=cfg.seed)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the soft prompts; returns the final metrics (floats) and the export paths."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    domain_cfg = OmegaConf.to_container(cfg.domain, resolve=True)
    refs, held = load_domain(**domain_cfg)
    write_jsonl(out / "references.jsonl", refs)
    write_jsonl(out / "heldout.jsonl", held)

    module = build_module(cfg, len(refs))
    min_batch = 2 if cfg.method.name == "domino" else 1
    dm = DomainDataModule(module.tokenizer, [r["text"] for r in refs], [r["text"] for r in held],
                          batch_size=cfg.data.batch_size, max_len=cfg.data.max_len,
                          val_size=cfg.data.val_size, num_workers=cfg.data.num_workers, min_batch=min_batch)
    loggers = [TensorBoardLogger(save_dir=str(out), name="tensorboard", version=""),
               CSVLogger(save_dir=str(out), name="csv", version="")]
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.get("checkpoint_every_n_steps") or None)
    callbacks = [ckpt, LearningRateMonitor(logging_interval="step")]
    meta_base = {"config_hash": config_hash(cfg), "reference_fingerprint": fingerprint(refs),
                 "n_references": len(refs), "domain": cfg.domain.name, "git_commit": git_commit(),
                 "references": str(out / "references.jsonl"), "heldout": str(out / "heldout.jsonl")}
    if cfg.get("export_epochs") or cfg.get("diagnostics"):
        from domino.training.diagnostics import EpochPoints
        callbacks.append(EpochPoints(out, list(cfg.get("export_epochs") or []), bool(cfg.get("diagnostics")),
                                     dm.train_ids, dm.val_ids, cfg.data.batch_size, lambda: meta_base))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers, callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result: dict[str, Any] = {"metrics": metrics, "output_dir": str(out)}
    if trainer.is_global_zero:
        meta = {**meta_base, "steps": trainer.global_step, "epochs": trainer.current_epoch, "metrics": metrics}
        result["domain_prompt"] = str(module.export_domain_prompt(out, meta))
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        log.info("domain prompt written to %s", result["domain_prompt"])
    return result
