"""Run a sweep: one point per combination of the overrides, each end to end.

    python experiments/sweep.py -m variant=base,batched,scaling rps=1,5,10
    python experiments/sweep.py -m experiment=study hydra/launcher=slurm model=a6000
    python experiments/sweep.py -m +search=max_rps slo.p99_s=2 variant=base,batched

Points land in outputs/<tag>/<point>/; a point that has its summary.csv is skipped, so the
same command run again resumes.  `python experiments/aggregate.py` makes the tables, plots
and report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rag.config import CONF_DIR, register_configs
from rag.harness.point import run_point

register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    hydra_cfg = HydraConfig.get()
    return run_point(cfg, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))


if __name__ == "__main__":
    main()
