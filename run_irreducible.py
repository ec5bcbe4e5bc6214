"""Irreducible-loss entry: `python run_irreducible.py +experiment=NAME_irred` trains the IL model on the holdout split."""
import hydra
from omegaconf import DictConfig

import datamatters.tasks.schema  # noqa: F401  (registers config schemas)
from datamatters.tasks.common import dispatch


@hydra.main(version_base="1.3", config_path="configs", config_name="irreducible")
def main(cfg: DictConfig) -> None:
    dispatch(cfg)


if __name__ == "__main__":
    main()
