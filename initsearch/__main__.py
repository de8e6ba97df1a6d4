"""``python -m initsearch [overrides]`` and the ``initsearch`` console script."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from initsearch.cli import config_dir, report_error, run
from initsearch.errors import InitSearchError


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _app(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except InitSearchError as exc:
        sys.exit(report_error(exc, bool(cfg.get("verbose", False))))


def main() -> None:
    _app()


if __name__ == "__main__":
    main()
