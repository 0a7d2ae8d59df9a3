"""Fine-tune a LoRA adapter on curated SFT records.

    python finetune.py data=<run>/sft.jsonl backbone=smollm2
    python finetune.py data=<run>/sft.jsonl backbone=qwen trainer=deepspeed
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    from domino.stages import finetune  # heavy imports after Hydra has parsed the command line

    result = finetune(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
