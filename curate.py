"""Curate synthetic samples into instruction/response pairs (filters, judge, responses, code checks).

    python curate.py samples=lightning_logs/synthesize/runs/<time>/samples.jsonl
    python curate.py samples=<run>/samples.jsonl curation=text      # a non-code domain
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="curate")
def main(cfg: DictConfig) -> object:
    return run_stage("curate", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
