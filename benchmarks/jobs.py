"""Running jobs: what ``@hydra.main`` calls for each run (also for each job of a ``-m`` sweep).

(Being rebuilt: every job in its own process.)
"""

from __future__ import annotations

from backends.base import ConfigError
from benchmarks.cli import EXIT_DIVERGED, fail


def task(cfg) -> float:
    """Run one benchmark in Hydra's run directory; returns the eval loss (for sweepers)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from benchmarks.harness import Diverged, run
    plain = OmegaConf.to_container(cfg, resolve=True)
    out_dir = HydraConfig.get().runtime.output_dir
    try:
        summary = run(plain, out_dir)
    except ConfigError as exc:
        fail(str(exc))
    except Diverged as exc:
        fail(f"{exc} (files kept in {out_dir})", EXIT_DIVERGED)
    return float(summary["eval_loss"])
