"""Command-line checks for ``run.py``: one-line errors before Hydra starts.

``preflight`` composes the config of every job the command line describes, the way Hydra will
(a plain run is one job; ``-m`` expands the sweep as Hydra's BasicSweeper does: the config's
``hydra.sweeper.params`` first, then the command line), and checks each one: values, files,
weights, the installed framework, the memory it needs, and its run directory. A bad job stops
everything with one line (``error: key=value: what is allowed``, prefixed with ``job N (...)`` in a
sweep) and exit code 2, before any run directory, data load or framework import. What runs each
job is :mod:`benchmarks.jobs`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from backends.base import ConfigError
from benchmarks import registry

GROUPS = ("backend", "strategy", "data", "experiment")
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
MULTIRUN_FLAGS = ("-m", "--multirun")
RUN_FLAGS = ("-r", "--run")


class UsageError(Exception):
    """A user error that is not one config value (a Hydra composition error): its message is the
    one line after ``error: ``."""


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _check_group_values(args: Sequence[str]) -> None:
    for arg in args:
        if "=" not in arg or arg.startswith("hydra."):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if "(" in value:    # a sweep function (glob(*), choice(...)): compose_jobs expands and checks it
            continue
        if key in GROUPS and os.path.isdir(os.path.join(registry.CONF_DIR, key)):
            allowed = registry.group_options(key)
            for v in value.split(","):
                if v and v not in allowed:
                    fail(f"{key}={v!r}: allowed: {', '.join(allowed)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _hydra_message(exc: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's multi-line errors as one line naming the offending override."""
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    cause = exc.__cause__
    if "Could not override" in text or "Could not append" in text:
        bad = text.split("'")[1] if "'" in text else "?"
        arg = next((o for o in overrides if o.lstrip("+~").split("=")[0] == bad), bad)
        detail = _first_line(cause) if cause else "not a config key"
        part = "hydra" if bad.startswith("hydra.") else "job"
        return f"{arg}: {detail} (python run.py --cfg {part} lists the keys)"
    merging = re.match(r"Error merging override (\S+)", text)
    if merging and cause is not None:
        return f"{merging.group(1)}: {_first_line(cause)}"
    return text or type(exc).__name__


# --------------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Job:
    """One run the command line starts: its number in the sweep (0 for a plain run), its task
    overrides, its resolved config (without the ``hydra`` node) and its output directory."""

    num: int
    overrides: List[str]
    config: Dict[str, Any]
    run_dir: str
    multirun: bool = False

    @property
    def label(self) -> str:
        """How errors name the job: ``job 7 (backend=keras train.lr=-1)``."""
        return f"job {self.num} ({' '.join(self.overrides)})"


def _plan(argv: Sequence[str]) -> Optional[Tuple[bool, List[str]]]:
    """``(multirun, overrides)`` for a plain run or a ``-m``/``--multirun`` sweep; None for every
    other Hydra command (``--help``, ``--cfg``, ``--info``, ``-c``, ...), which Hydra handles."""
    multirun, overrides = False, []
    for arg in argv:
        if arg in MULTIRUN_FLAGS:
            multirun = True
        elif arg in RUN_FLAGS:
            continue
        elif arg.startswith("-"):
            return None
        else:
            overrides.append(arg)
    return multirun, overrides


def _raw(cfg: Any, key: str) -> Any:
    """The unresolved value at dotted ``key`` (an interpolation shows as written)."""
    from omegaconf import OmegaConf
    try:
        node = OmegaConf.to_container(cfg, resolve=False)
        for part in key.split("."):
            node = node[int(part) if isinstance(node, list) else part]
        return node
    except Exception:  # noqa: BLE001 - only for the message
        return None


def _resolution_error(exc: Exception, cfg: Any, key: Optional[str] = None) -> ConfigError:
    key = key or getattr(exc, "full_key", None) or "config"
    msg = getattr(exc, "msg", None) or str(exc)
    detail = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    detail = re.sub(r"^\w+ (raised )?while resolving interpolation: ", "", detail).strip().strip("\"'")
    return ConfigError(key, _raw(cfg, key), detail)


def _task_config(cfg: Any) -> Dict[str, Any]:
    """The job's config as the task gets it: resolved, without the ``hydra`` node (removed from
    ``cfg`` itself, as Hydra's run_job does; read the run directory first)."""
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise _resolution_error(exc, cfg) from None


def _select(cfg: Any, key: str) -> str:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    try:
        return str(OmegaConf.select(cfg, key, throw_on_missing=True))
    except OmegaConfBaseException as exc:
        raise _resolution_error(exc, cfg, key) from None


@contextlib.contextmanager
def _config_files_read_once() -> Iterator[None]:
    """While composing a sweep's jobs, read each config file once: Hydra re-reads and re-parses
    every yaml file (its own included) for every job, about a quarter of the ~90 ms a job takes.
    Each caller still gets its own deep copy, so what Hydra composes is unchanged."""
    from hydra._internal.config_repository import ConfigRepository
    original = ConfigRepository.load_config
    memo: Dict[Any, Any] = {}

    def load_config(self: Any, config_path: str) -> Any:
        key = (tuple((type(s).__name__, s.path) for s in self.sources), config_path)
        if key not in memo:
            memo[key] = original(self, config_path)
        return copy.deepcopy(memo[key])

    ConfigRepository.load_config = load_config  # type: ignore[method-assign]
    try:
        yield
    finally:
        ConfigRepository.load_config = original  # type: ignore[method-assign]


def compose_jobs(argv: Sequence[str]) -> Optional[List[Job]]:
    """Every job ``python run.py ARGV`` would start, composed with Hydra's own code paths: the run
    mode as Hydra picks it (``-m``, or ``hydra.mode``); a plain run is one job in ``hydra.run.dir``;
    a sweep is expanded like BasicSweeper (``hydra.sweeper.params``, then the command line, each
    axis in that order; ``OverridesParser`` + ``BasicSweeper.split_arguments``) and each job
    composed like BasicLauncher (``load_sweep_config`` with the sweep's hydra overrides,
    ``hydra.job.num``), in ``hydra.sweep.dir/hydra.sweep.subdir``. ``${now:...}`` resolves when
    this runs, so a directory may differ by a second from the one Hydra creates.

    Returns None for a command that runs no job (``--help``, ``--cfg``, ...) or a sweeper other
    than the basic one; raises :class:`UsageError` or :class:`ConfigError` with a one-line message.
    """
    plan = _plan(argv)
    if plan is None:
        return None
    multirun, overrides = plan
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=registry.CONF_DIR, version_base="1.3", job_name="run"), \
            _config_files_read_once():
        hydra = GlobalHydra.instance().hydra
        # the run mode, as hydra._internal.utils._run_app decides it (with -m it is MULTIRUN
        # whatever the config says: no need to compose it to find out)
        mode = RunMode.MULTIRUN if multirun else _compose(hydra, overrides, RunMode.MULTIRUN,
                                                          validate_sweep_overrides=False).hydra.mode
        if multirun or mode is None:
            mode = mode or RunMode.RUN
            overrides = overrides + [f"hydra.mode={mode.name}"]
        if mode == RunMode.RUN:
            cfg = _compose(hydra, overrides, RunMode.RUN)
            HydraConfig.instance().set_config(cfg)
            task = OmegaConf.to_container(cfg.hydra.overrides.task)
            run_dir = str(Path(_select(cfg, "hydra.run.dir")))      # before _task_config drops hydra
            return [Job(0, list(task), _task_config(cfg), run_dir)]
        return _sweep_jobs(hydra, _compose(hydra, overrides, RunMode.MULTIRUN))


def _compose(hydra: Any, overrides: List[str], mode: Any, **kw: Any) -> Any:
    """Hydra's composition of the config (with its hydra node); its errors as one line."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        return hydra.compose_config(config_name="config", overrides=list(overrides), run_mode=mode,
                                    with_log_configuration=False, **kw)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UsageError(_hydra_message(exc, overrides)) from None


def _sweep_jobs(hydra: Any, master: Any) -> Optional[List[Job]]:
    """The jobs of a sweep whose composed config is ``master``, as BasicSweeper expands them and
    BasicLauncher composes each (None for another sweeper)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException
    if OmegaConf.select(master, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.to_container(master.hydra.sweeper, resolve=True).get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(
        OmegaConf.to_container(master.hydra.overrides.task, resolve=False))
    try:
        parsed = OverridesParser.create(config_loader=hydra.config_loader).parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UsageError(_hydra_message(exc, arguments)) from None
    jobs = []
    for num, job_overrides in enumerate(batches[0]):
        job = Job(num, list(job_overrides), {}, "", multirun=True)
        try:
            try:
                cfg = hydra.config_loader.load_sweep_config(master, list(job_overrides))
            except (HydraException, OmegaConfBaseException, ValueError) as exc:
                raise UsageError(_hydra_message(exc, job_overrides)) from None
            with open_dict(cfg):
                cfg.hydra.job.id = num
                cfg.hydra.job.num = num
            HydraConfig.instance().set_config(cfg)
            job.run_dir = str(Path(_select(cfg, "hydra.sweep.dir")) / _select(cfg, "hydra.sweep.subdir"))
            job.config = _task_config(cfg)
        except (UsageError, ConfigError) as exc:
            raise UsageError(f"{job.label}: {exc}") from None
        jobs.append(job)
    return jobs


# --------------------------------------------------------------------------- checks
class Checker:
    """Checks composed configs (plain dicts); remembers what a sweep's jobs share (weight files,
    text files, the available memory) so each is read once."""

    def __init__(self, available: Optional[int] = None):
        self.available = available
        self._weights: Dict[Any, bool] = {}
        self._sizes: Dict[str, Any] = {}

    def memory_available(self) -> int:
        if self.available is None:
            import psutil
            self.available = int(psutil.virtual_memory().available)
        return self.available

    def data_size(self, data: Dict[str, Any]) -> Any:
        """The data source's size (``size()``: a source that reads files to size itself, such as
        a text file, catches empty files here); first, each file it reads must fit in memory."""
        from benchmarks.config import format_bytes
        key = json.dumps(data, sort_keys=True, default=str)
        if key not in self._sizes:
            source = registry.build_dataset(data)
            for k, path in source.files():
                need = source.load_bytes_per_token * os.path.getsize(path)
                if need > self.memory_available():
                    raise ConfigError(k, path, f"reading this file needs about {format_bytes(need)} of "
                                      f"memory; {format_bytes(self.memory_available())} are available")
            self._sizes[key] = source.size()
        return self._sizes[key]

    def check(self, plain: Dict[str, Any]) -> None:
        """Raise ConfigError for the first problem of a composed config: values, the installed
        framework, the weights file, the data file, the memory the run needs."""
        from backends.base import load_weights
        from benchmarks.config import check_memory, model_spec, validate
        validate(plain)
        registry.check_installed(plain["backend"])
        init = plain["model"].get("init")
        if init:
            spec = model_spec(plain)
            st = os.stat(init)
            key = (os.path.abspath(init), st.st_mtime_ns, st.st_size, spec)
            if key not in self._weights:
                load_weights(init, spec)
                self._weights[key] = True
        check_memory(plain, self.data_size(plain["data"]), self.memory_available())


def check_config(plain: Dict[str, Any]) -> None:
    """Validate a composed config (plain dict); exit with a one-line error if it is bad."""
    try:
        Checker().check(plain)
    except ConfigError as exc:
        fail(str(exc))


def check_jobs(jobs: Sequence[Job], checker: Optional[Checker] = None) -> None:
    """Check every job's config and run directory (:func:`benchmarks.rundir.check`); two jobs of a
    sweep may not share a directory. Raises ConfigError or UsageError, prefixed with the job's
    label in a sweep."""
    from benchmarks import rundir
    checker = checker or Checker()
    owners: Dict[str, Job] = {}
    for job in jobs:
        try:
            checker.check(job.config)
            rundir.check(job.run_dir, overwrite=job.config["overwrite"])
            where = os.path.abspath(job.run_dir)
            if where in owners:
                raise ConfigError("hydra.sweep.subdir", job.run_dir, f"{owners[where].label} writes the same "
                                  f"directory; make hydra.sweep.subdir unique per job (e.g. with "
                                  f"${{hydra.job.num}})")
            owners[where] = job
        except ConfigError as exc:
            if job.multirun:
                raise UsageError(f"{job.label}: {exc}") from None
            raise


def preflight(argv: List[str]) -> None:
    """Validate every job of the command line; exit with a one-line error if one is bad."""
    _check_group_values(argv)
    try:
        jobs = compose_jobs(argv)
        if jobs:
            check_jobs(jobs)
    except (UsageError, ConfigError) as exc:
        fail(str(exc))
