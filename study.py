"""The evidence study: DOMINO vs prompt tuning vs prompt baselines, seeded, with intervals.

    python study.py experiment=study_humaneval          # the whole study; rerun the same command to resume
    python study.py experiment=study_humaneval stage=report study.dir=results/study_humaneval
                                                        # recompute every metric from committed samples
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> object:
    return run_stage("study", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
