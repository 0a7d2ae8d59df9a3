"""What every stage records about where its output came from."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str | None:
    """The commit of the domino checkout that is running, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    """Short sha256 of a JSON-able value (keys sorted, non-JSON values as str): the one content
    fingerprint of configs, stage inputs and sample-store inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: Any) -> str:
    """json_hash of a run's (resolved) config: an OmegaConf node or a plain mapping. (A backbone's
    architecture has its own hash: backbone.model_config_hash.)"""
    from omegaconf import DictConfig, OmegaConf
    return json_hash(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
