#!/usr/bin/env python
"""resetbench: ``python run.py backend=jax strategy=packed`` (Hydra overrides; ``-m`` sweeps).

See README.md and conf/config.yaml for the keys; results land in results/runs/. This process
checks the command line and supervises; each run trains in a process of its own
(benchmarks/jobs.py), so no framework is ever imported here.
"""

import sys

import hydra

from benchmarks.cli import preflight
from benchmarks.jobs import sweep_exit_code, task


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> float:
    return task(cfg)


if __name__ == "__main__":
    preflight(sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt:          # between jobs: no run is active, nothing to save
        print("interrupted: stopped between jobs", file=sys.stderr)
        sys.exit(130)
    sys.exit(sweep_exit_code())
