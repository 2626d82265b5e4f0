"""Command-line checks for ``run.py``: one-line errors before Hydra starts.

``preflight`` composes the config from the command line with Hydra's compose API and validates
it, so a bad key or value stops with one line (``error: key=value: what is allowed``) and exit
code 2 before any run directory, data load or framework import. What runs each job is
:mod:`benchmarks.jobs`.
"""

from __future__ import annotations

import os
import sys
from typing import List, Sequence

from backends.base import ConfigError
from benchmarks import registry

GROUPS = ("backend", "strategy", "data", "experiment")
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _check_group_values(args: Sequence[str]) -> None:
    for arg in args:
        if "=" not in arg or arg.startswith("hydra."):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key in GROUPS and os.path.isdir(os.path.join(registry.CONF_DIR, key)):
            allowed = registry.group_options(key)
            for v in value.split(","):
                if v and v not in allowed:
                    fail(f"{key}={v!r}: allowed: {', '.join(allowed)}")


def _hydra_message(exc: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's multi-line errors as one line naming the offending override."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    cause = exc.__cause__
    if "Could not override" in text or "Could not append" in text:
        bad = text.split("'")[1] if "'" in text else "?"
        arg = next((o for o in overrides if o.lstrip("+~").split("=")[0] == bad), bad)
        detail = str(cause).splitlines()[0] if cause else "not a config key"
        return f"{arg}: {detail} (python run.py --cfg job lists the keys)"
    return text or type(exc).__name__


def preflight(argv: List[str]) -> None:
    """Validate the command line's config; exit with a one-line error if it is bad."""
    flags = [a for a in argv if a.startswith("-")]
    _check_group_values(argv)
    if flags:  # --multirun, --help, --cfg, ...: Hydra handles it; each job validates itself
        return
    overrides = [a for a in argv if not a.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    try:
        with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra override/composition errors
        fail(_hydra_message(exc, overrides))
        return
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_config(plain)


def check_config(plain) -> None:
    """Validate a composed config (plain dict): values, files, weights, installed framework."""
    from benchmarks.config import model_spec, validate
    from backends.base import load_weights
    try:
        validate(plain)
        if plain["model"].get("init"):
            load_weights(plain["model"]["init"], model_spec(plain))
        if plain["data"]["name"] == "textfile":   # cheap: catches empty files before Hydra starts
            from benchmarks.data import load_dataset
            load_dataset(plain["data"])
        registry.check_installed(plain["backend"])
    except ConfigError as exc:
        fail(str(exc))
