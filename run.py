#!/usr/bin/env python
"""resetbench: ``python run.py backend=jax strategy=packed`` (Hydra overrides; ``-m`` sweeps).

See README.md and conf/config.yaml for the keys; results land in results/runs/.
"""

import sys

import hydra

from benchmarks.cli import preflight
from benchmarks.jobs import task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    return task(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
