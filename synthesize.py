"""Sample new in-domain examples from learned domain tokens (or a baseline prompt).

    python synthesize.py ckpt=lightning_logs/train/runs/<time>/domain_prompt.safetensors n=1000
    python synthesize.py method=few_shot domain=humaneval n=1000
    python synthesize.py ckpt=... n=2000 output_dir=<the dir of an earlier run>   # resume / extend
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="synthesize")
def main(cfg: DictConfig) -> object:
    return run_stage("synthesize", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
