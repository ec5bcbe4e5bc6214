"""Main entry: `python run.py +experiment=NAME [overrides]` composes configs/train.yaml and runs cfg.task."""
import hydra
from omegaconf import DictConfig

import datamatters.tasks.schema  # noqa: F401  (registers config schemas)
from datamatters.tasks.common import dispatch


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    dispatch(cfg)


if __name__ == "__main__":
    main()
