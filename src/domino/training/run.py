"""What `train.py` runs: load the domain, write its splits, fit the soft prompts, export D."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from domino.core import attempt, lineage
from domino.core.config import instantiate
from domino.core.domains import load_domain, reference_fingerprint
from domino.core.locking import output_lock
from domino.core.provenance import config_hash, git_commit
from domino.core.records import write_jsonl
from domino.core.trainer import build_trainer, check_budget_left, interrupted_epoch, read_checkpoint, resume_logs_at
from domino.core.validate import TRAIN, check_config
from domino.training.datamodule import DomainDataModule
from domino.training.module import DominoModule, check_references

log = logging.getLogger(__name__)
# the frozen backbone is in eval mode on purpose (no dropout)
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the soft prompts; returns the final metrics (floats) and the export paths."""
    check_config(cfg, TRAIN, "train")
    out = Path(cfg.paths.output_dir)
    with output_lock(out, "train"):  # one run per directory: two would interleave checkpoints and logs
        return _train(cfg, out)


def _train(cfg: DictConfig, out: Path) -> dict[str, Any]:
    L.seed_everything(cfg.seed, workers=True)

    domain_cfg = OmegaConf.to_container(cfg.domain, resolve=True)
    refs, held = load_domain(**domain_cfg)
    ckpt_path = cfg.get("ckpt_path")
    resumed, cut_epoch = resume_point(ckpt_path, reference_fingerprint(refs), cfg.trainer) if ckpt_path else (0, None)
    attempt.accept(out)  # the run owns `out` from here: its record and log are written there
    write_jsonl(out / "references.jsonl", refs)
    write_jsonl(out / "heldout.jsonl", held)

    module: DominoModule = instantiate(cfg.module, n_references=len(refs), _convert_="all")
    module.reference_fingerprint = reference_fingerprint(refs)
    # partial: the texts and the tokenizer go in as they are, not through OmegaConf
    dm: DomainDataModule = instantiate(cfg.data, _partial_=True)(
        tokenizer=module.tokenizer, references=[r["text"] for r in refs],
        heldout=[r["text"] for r in held], min_batch=2 if module.with_samples else 1, seed=cfg.seed)
    callbacks = []
    meta_base = {"config_hash": config_hash(cfg), "reference_fingerprint": reference_fingerprint(refs),
                 "n_references": len(refs), "domain": cfg.domain.name, "git_commit": git_commit(),
                 "references": str(out / "references.jsonl"), "heldout": str(out / "heldout.jsonl")}
    if cfg.get("export_epochs") or cfg.get("diagnostics"):
        from domino.training.diagnostics import EpochPoints
        callbacks.append(EpochPoints(out, list(cfg.get("export_epochs") or []), bool(cfg.get("diagnostics")),
                                     dm.train_ids, dm.val_ids, cfg.data.batch_size, lambda: meta_base))
    trainer = build_trainer(cfg, callbacks)
    resume_logs_at(trainer, resumed, cut_epoch)  # metrics.csv keeps the earlier rows up to the resumed step
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    result: dict[str, Any] = {"metrics": metrics, "output_dir": str(out)}
    if trainer.is_global_zero:
        meta = {**meta_base, "steps": trainer.global_step, "epochs": trainer.current_epoch, "metrics": metrics}
        result["domain_prompt"] = str(module.export_domain_prompt(out, meta))
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        from domino.core.domain_prompt import load_domain_prompt
        lineage.write(out, train_run=str(out.resolve()), domain_prompt=str(Path(result["domain_prompt"]).resolve()),
                      domain_prompt_digest=load_domain_prompt(result["domain_prompt"]).digest,
                      references=str((out / "references.jsonl").resolve()),
                      heldout=str((out / "heldout.jsonl").resolve()),
                      reference_fingerprint=meta_base["reference_fingerprint"], backbone_id=module.backbone_id)
        log.info("domain prompt written to %s", result["domain_prompt"])
    return result


def resume_point(ckpt_path: str, reference_fingerprint: str,
                 trainer_cfg=None) -> tuple[int, int | None]:
    """(global step, the epoch it cut mid-way or None) of `ckpt_path`, after checking it can be
    read (else the error names the file), was trained on the same references, and has something
    left to train under
    `trainer_cfg` (a checkpoint at or past max_steps / max_epochs is reported, not re-exported). A
    DeepSpeed checkpoint directory is left to DeepSpeed (its step is not known here: the logs are
    kept whole)."""
    path = Path(ckpt_path)
    if path.is_dir():
        return 0, None
    ckpt = read_checkpoint(path)
    check_references(ckpt.get("domino") or {}, reference_fingerprint, path)
    check_budget_left(ckpt, path, trainer_cfg)
    return int(ckpt.get("global_step", 0)), interrupted_epoch(ckpt)
