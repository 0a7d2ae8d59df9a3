"""Fine-tune a LoRA adapter on curated SFT records.

    python finetune.py data=<run>/sft.jsonl backbone=smollm2
    python finetune.py data=<run>/sft.jsonl backbone=qwen trainer=deepspeed
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)
from domino.cli import run_stage


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    return run_stage("finetune", cfg)  # the stage's heavy imports happen after Hydra parsed the command line


if __name__ == "__main__":
    main()
