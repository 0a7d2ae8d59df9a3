"""Learn DOMINO domain tokens from reference examples.

    python train.py domain=humaneval backbone=smollm2
    python train.py -m objective.lambda=0,0.5,1 trainer.max_steps=20
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_stage("train", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
