"""Data-quality report of sample sets: diversity, alignment with held-out data, memorisation.

    python data_quality.py references=<train run>/references.jsonl samples='{domino: a.jsonl, few_shot: b.jsonl}'
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="data_quality")
def main(cfg: DictConfig) -> object:
    return run_stage("data_quality", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
