"""Learn DOMINO domain tokens from reference examples.

    python train.py domain=humaneval backbone=smollm2
    python train.py -m method.lambda=0,0.5,1 trainer.max_steps=20
"""
import hydra
from omegaconf import DictConfig

import domino  # noqa: F401  (registers the config resolvers)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from domino.stages import train  # heavy imports after Hydra has parsed the command line

    result = train(cfg)
    metric = cfg.get("optimized_metric")
    return result["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    main()
