"""Evaluation stage: pass@k of a backbone (+ LoRA adapter) on a code benchmark, or of existing samples.

    python evaluate.py backbone=smollm2 benchmark=humaneval n_samples=1 k=[1]
    python evaluate.py samples=completions.jsonl benchmark=humaneval
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> object:
    return run_stage("evaluate", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
