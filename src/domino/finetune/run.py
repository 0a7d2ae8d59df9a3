"""What `finetune.py` runs: read the SFT records, fit a LoRA adapter, export it with provenance."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from domino.core import attempt, lineage
from domino.core.backbone import hub_id
from domino.core.locking import output_lock
from domino.core.provenance import config_hash, git_commit
from domino.core.trainer import build_trainer, check_budget_left, interrupted_epoch, read_checkpoint, resume_logs_at
from domino.core.validate import FINETUNE, check_config
from domino.finetune.data import SFTDataModule, load_sft, sha256_file, split
from domino.finetune.module import CKPT_META, LoRAModule

log = logging.getLogger(__name__)
# the frozen base is in eval mode on purpose (no dropout)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
PROVENANCE = "domino_finetune.json"
VAL_METRIC = "val/loss"


def build_module(cfg: DictConfig) -> LoRAModule:
    lo, opt = cfg.lora, cfg.optim
    return LoRAModule(backbone=OmegaConf.to_container(cfg.backbone, resolve=True), r=lo.r, alpha=lo.alpha,
                      dropout=lo.dropout, dropout_draws=lo.dropout_draws, target_modules=list(lo.target_modules),
                      bias=lo.bias, lr=opt.lr, weight_decay=opt.weight_decay, betas=list(opt.betas),
                      warmup_steps=opt.warmup_steps, seed=cfg.seed, forward_cost=cfg.sft.forward_cost)


def read_data(cfg: DictConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Training and validation records (a seeded split unless `val_data` names a file) and their
    provenance. Relative paths are relative to where the command was started (no chdir)."""
    path = Path(cfg.data).expanduser().resolve()
    records = load_sft(path)
    info: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path), "n_records": len(records)}
    if cfg.get("val_data"):
        vpath = Path(cfg.val_data).expanduser().resolve()
        train, val = records, load_sft(vpath)
        info["val_data"] = {"path": str(vpath), "sha256": sha256_file(vpath)}
    else:
        train, val = split(records, cfg.sft.val_size, cfg.seed)
    info.update(n_train=len(train), n_val=len(val), val_ids=[r["id"] for r in val])
    return train, val, info


def data_digest(info: dict[str, Any]) -> str:
    """What the adapter is trained on: the SFT file's sha256 (and the validation file's, if any)."""
    val = (info.get("val_data") or {}).get("sha256")
    return info["sha256"] if not val else f"{info['sha256']}+{val}"


def check_same_data(meta: dict, info: dict[str, Any], ckpt_path: str) -> None:
    """Refuse to resume LoRA weights trained on another SFT file: the adapter's provenance would name
    only the new one (checkpoints of earlier releases carry no digest and are not checked)."""
    had, now = meta.get("data_sha256"), data_digest(info)
    if had and had != now:
        raise ValueError(f"{ckpt_path} was trained on SFT data sha256 {had}, data={info['path']} is {now}: resume "
                         "with the same data= (and val_data=), or start a new run without ckpt_path")


def callbacks_for(cfg: DictConfig, out: Path, has_val: bool) -> tuple[list, ModelCheckpoint | None]:
    """What finetune adds to the `callbacks` group: the best checkpoint and early stopping, which
    need a validation split."""
    callbacks: list = []
    best = None
    if has_val:
        best = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor=VAL_METRIC,
                               mode="min", save_top_k=1, save_last=False, auto_insert_metric_name=False)
        callbacks.append(best)
        es = cfg.early_stopping
        if es.patience is not None:
            callbacks.append(EarlyStopping(monitor=VAL_METRIC, mode="min", patience=es.patience,
                                           min_delta=es.min_delta, check_on_train_epoch_end=False))
    else:
        log.warning("no validation records (sft.val_size=0 or a single record): no early stopping, "
                    "the adapter is the last step's")
    return callbacks, best


def canonical_adapter_config(adapter: Path) -> None:
    """peft keeps target_modules as a set and saves it in set order, which follows the process's
    string-hash seed: the same adapter got a different adapter_config.json (and evaluate.py
    fingerprint) run to run. Rewrite it with those lists sorted, as peft writes it otherwise."""
    path = adapter / "adapter_config.json"
    conf = json.loads(path.read_text())
    for key in ("target_modules", "exclude_modules"):
        if isinstance(conf.get(key), list):
            conf[key] = sorted(conf[key])
    path.write_text(json.dumps(conf, indent=2, sort_keys=True))


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fit the adapter; returns the final metrics (floats) and the export paths."""
    check_config(cfg, FINETUNE, "finetune")
    if cfg.export not in ("best", "last"):
        raise ValueError(f"export={cfg.export!r} is not one of ('best', 'last')")
    out = Path(cfg.paths.output_dir)
    with output_lock(out, "finetune"):  # one run per directory: two would interleave checkpoints and logs
        return _finetune(cfg, out)


def _finetune(cfg: DictConfig, out: Path) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)
    ckpt_path = cfg.get("ckpt_path")
    # a damaged checkpoint is named before anything is loaded; its step bounds the kept log rows
    ckpt = read_checkpoint(ckpt_path) if ckpt_path and Path(ckpt_path).is_file() else None
    resumed = int(ckpt.get("global_step", 0)) if ckpt else 0

    train, val, data_info = read_data(cfg)
    if ckpt is not None:
        check_same_data(ckpt.get(CKPT_META) or {}, data_info, ckpt_path)
        check_budget_left(ckpt, ckpt_path, cfg.trainer)
    attempt.accept(out)  # the run owns `out` from here: its record and log are written there
    module = build_module(cfg)
    module.data_sha256 = data_digest(data_info)
    s = cfg.sft
    dm = SFTDataModule(module.tokenizer, train, val, max_len=s.max_len, batch_size=s.batch_size,
                       packing=s.packing, shuffle=s.shuffle, num_workers=s.num_workers, seed=cfg.seed)
    data_info.update(n_train_tokens=dm.n_train_tokens, n_label_tokens=dm.n_label_tokens,
                     n_train_rows=len(dm.train_rows))
    callbacks, best = callbacks_for(cfg, out, bool(val))
    trainer = build_trainer(cfg, callbacks)
    resume_logs_at(trainer, resumed, interrupted_epoch(ckpt) if ckpt else None)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result: dict[str, Any] = {"metrics": metrics, "output_dir": str(out)}
    if not trainer.is_global_zero:
        return result
    exported_from = "last"
    best_path = best.best_model_path if best is not None else ""
    if cfg.export == "best" and best_path:
        if Path(best_path).is_file():
            module.load_trainable(best_path)
            exported_from = "best"
        else:  # DeepSpeed writes a directory of shards; the in-memory weights are the last step's
            log.warning("best checkpoint %s is not a single file (DeepSpeed?): exporting the last weights",
                        best_path)
    adapter = module.export_adapter(out / "adapter")
    canonical_adapter_config(adapter)
    import peft
    import torch
    import transformers
    prov = {"data": data_info,
            "base_model": {"id": module.backbone_id, "model_hash": module.backbone_hash,
                           "hub_id": hub_id(OmegaConf.to_container(cfg.backbone, resolve=True)),
                           "local_source": getattr(module, "base_local", None),
                           "backbone": OmegaConf.to_container(cfg.backbone, resolve=True)},
            "lora": OmegaConf.to_container(cfg.lora, resolve=True),
            "exported_from": exported_from, "best_checkpoint": best_path or None,
            "best_val_loss": float(best.best_model_score) if best is not None and best.best_model_score is not None
            else None,
            "steps": trainer.global_step, "epochs": trainer.current_epoch, "metrics": metrics,
            "config_hash": config_hash(cfg), "git_commit": git_commit(),
            "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                         "torch": torch.__version__},
            "config": OmegaConf.to_container(cfg, resolve=True)}
    prov["lineage"] = lineage.read(lineage.write(adapter, lineage.read(data_info["path"]), sft=data_info["path"],
                                                 sft_sha256=data_info["sha256"], adapter=str(adapter.resolve())))
    (adapter / PROVENANCE).write_text(json.dumps(prov, indent=2, default=str))
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    result["adapter"] = str(adapter)
    log.info("LoRA adapter (%s weights) written to %s", exported_from, adapter)
    if cfg.merge:
        result["merged"] = str(module.export_merged(out / "merged"))
        log.info("merged weights written to %s", result["merged"])
    return result
