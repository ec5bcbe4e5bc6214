"""Main entry: `python run.py +experiment=NAME [overrides]` composes configs/train.yaml and runs cfg.task."""
import hydra
from omegaconf import DictConfig

from datamatters.tasks.common import dispatch


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    dispatch(cfg)


if __name__ == "__main__":
    main()
