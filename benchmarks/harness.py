"""One benchmark run: data -> layout -> backend; warm-up, timed steps, evaluation, result files.

The harness imports no framework: the backend is built through :mod:`benchmarks.registry` after
every config value, data file and weight file has been checked. :func:`run` reads top to bottom;
its parts are :class:`benchmarks.timing.StopRule` (when to stop), :class:`benchmarks.timing.StepTimer`
(warm-up, compilation outside the clock, synchronized clocks), :class:`benchmarks.writer.RunWriter`
(the files) and :class:`benchmarks.summary.RunSummary` (what ``summary.json`` holds).

Every way a run can end leaves valid files with a final ``status``: ``completed``; ``diverged``
(NaN/inf loss); ``interrupted`` / ``terminated`` (SIGINT / SIGTERM or SIGHUP, through a
:class:`benchmarks.signals.StopGuard`: the run stops between steps and saves the last completed
step's weights); ``failed`` (any error, a failed write included). A training step and its
``steps.csv`` row are one critical section, so the summary's step count always matches steps.csv.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from backends.base import Backend, ModelSpec, OptimizerSpec, init_weights, load_weights
from benchmarks import registry, rundir
from benchmarks.config import model_spec, optimizer_spec, validate
from benchmarks.data import Dataset, load_dataset
from benchmarks.env import CpuMonitor, environment, is_busy, peak_rss_bytes, reset_peak_rss, tune_malloc
from benchmarks.signals import NO_GUARD, Stopped
from resetbench.layouts import Epoch, Layout, eval_batches
from benchmarks.summary import RunSummary
from benchmarks.targets import AXES, time_to_targets
from benchmarks.timing import Progress, StepTimer, StopRule
from benchmarks.writer import RunWriter, WriteError


class Diverged(RuntimeError):
    """The training loss became NaN or inf."""


@dataclasses.dataclass
class Setup:
    """Everything a run needs before a framework is imported: sizes, data, layout, weights."""

    spec: ModelSpec
    optimizer: OptimizerSpec
    dataset: Dataset
    layout: Layout
    weights: Dict[str, np.ndarray]
    eval_epoch: Epoch
    batch_size: int
    window: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Setup":
        t, seed = cfg["train"], int(cfg["train"]["seed"])
        spec = model_spec(cfg)
        dataset = load_dataset(cfg["data"], seed)
        B, T = int(t["batch_size"]), int(t["window"])
        init = cfg["model"].get("init")
        return cls(spec, optimizer_spec(cfg), dataset,
                   registry.build_layout(cfg["strategy"], B, T, seed),
                   load_weights(init, spec) if init else init_weights(spec, seed),
                   eval_batches(dataset.eval, int(cfg["eval"]["batch_size"]), int(cfg["eval"]["window"])), B, T)


class Evaluator:
    """Evaluations during and after training: each one off the training clock, written to
    ``evals.csv``, kept in ``history`` for the time-to-target fields of the summary."""

    def __init__(self, backend: Backend, batches: Epoch, timer: StepTimer, writer: RunWriter, summary: RunSummary):
        self.backend, self.batches, self.timer, self.writer, self.summary = backend, batches, timer, writer, summary
        self.history: List[Dict[str, float]] = []

    def __call__(self, p: Progress, guard: Any) -> Tuple[float, int]:
        with self.timer.excluded() as dt:
            loss, count = evaluate(self.backend, self.batches)
        self.summary.eval_time_s += dt[0]
        train_s = self.timer.elapsed()
        self.history.append({"train_s": train_s, "tokens": p.valid, "steps": p.step, "eval_loss": loss,
                             "eval_tokens": count})
        with guard.critical():
            self.writer.eval((p.step, p.valid, f"{train_s:.6f}", f"{loss:.6f}", count, f"{dt[0]:.4f}"))
        return loss, count

    def final(self, p: Progress, guard: Any) -> Tuple[float, int]:
        """The evaluation after training (the periodic one of the last step, if there was one)."""
        if self.history and self.history[-1]["steps"] == p.step:
            last = self.history[-1]
            return last["eval_loss"], last["eval_tokens"]
        return self(p, guard)

    def targets(self, targets) -> Dict[str, Optional[float]]:
        """``ttt_<axis>@<target>`` summary fields: where the eval loss first reached each target."""
        out: Dict[str, Optional[float]] = {}
        for t, hit in time_to_targets(self.history, targets).items():
            out.update({f"ttt_{a}@{t}": (hit or {}).get(a) for a in AXES})
        return out


def evaluate(backend: Backend, batches: Epoch) -> Tuple[float, int]:
    """Mean cross-entropy (nats per target) over the eval set, every sequence from a zero state.
    The training state is saved and restored around it."""
    saved = backend.get_state()
    backend.reset_state(batches.shapes[0][0] if len(batches) else backend.batch_size)
    total, count = 0.0, 0
    for batch in batches:
        total += float(backend.eval_step(batch))
        count += batch.valid_tokens
    backend.set_state(*saved)
    return (total / count if count else float("nan")), count


def run(cfg: Mapping[str, Any], out_dir: str, echo: Callable[[str], None] = print,
        guard: Any = NO_GUARD) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` (a plain dict of the composed config) says; write the run
    files into ``out_dir``; return the summary as a dict. User errors raise ConfigError before any
    framework import; every other ending leaves a final status in ``summary.json`` (module
    docstring) and re-raises: :class:`Diverged`, :class:`benchmarks.signals.Stopped`,
    :class:`benchmarks.writer.WriteError`, or the error itself."""
    validate(cfg)
    monitor, peak_is_per_run = CpuMonitor(), reset_peak_rss()
    setup = Setup.from_config(cfg)
    registry.check_installed(cfg["backend"])           # before the heavy import
    os.makedirs(out_dir, exist_ok=True)
    summary = RunSummary.from_config(cfg).update(
        **_process_identity(), **environment(), **setup.dataset.summary(), peak_mem_per_run=peak_is_per_run,
        started_at=_now(), load_avg_start=_load_avg(), eval_time_s=0.0,
        kernel_role=registry.kernel_decl(cfg["backend"], cfg["backend"]["kernel"]).role)
    writer = RunWriter(out_dir)
    progress, timer, backend = Progress(), None, None
    try:
        with guard.critical():
            writer.summary(summary)
        if cfg.get("tune_malloc", True):
            tune_malloc()
        backend = registry.build_backend(dict(cfg["backend"]), setup.spec, setup.weights, setup.optimizer,
                                         setup.batch_size, device=cfg["device"])
        summary.update(kernel=backend.kernel, device=backend.device, malloc=environment()["malloc"],
                       framework_version=_framework_version(backend, cfg["backend"]["name"]),
                       **{f"{k}_version": v for k, v in backend.versions().items()})
        echo(_header(summary, setup))
        timer = StepTimer(backend, int(cfg["train"]["warmup_steps"]))
        evaluator = Evaluator(backend, setup.eval_epoch, timer, writer, summary)
        reason = train(cfg, setup, backend, timer, writer, summary, monitor, progress, guard, evaluator)
        eval_loss, eval_tokens = evaluator.final(progress, guard)
        _fill(summary, progress, timer, backend, "completed", reason)
        summary.update(eval_loss=eval_loss, eval_tokens=eval_tokens, eval_bits_per_byte=eval_loss / math.log(2),
                       targets=list(cfg["eval"].get("targets") or []),
                       **evaluator.targets(cfg["eval"].get("targets") or []))
        with guard.critical():
            writer.weights(backend.get_weights())
            writer.summary(summary)
    except BaseException as exc:           # leave valid files with a final status, then re-raise
        _finish_after(exc, summary, progress, timer, backend, writer)
        raise
    finally:
        writer.close()
    _warn_if_busy(summary, echo)
    echo(format_summary(summary.to_dict(), out_dir))
    return summary.to_dict()


def train(cfg: Mapping[str, Any], setup: Setup, backend: Backend, timer: StepTimer, writer: RunWriter,
          summary: RunSummary, monitor: CpuMonitor, p: Progress, guard: Any, evaluate_now: "Evaluator") -> str:
    """The training loop: epochs of the layout until the stop rule says why it stopped. With
    periodic evaluations, one also runs before the first step (the start of every loss curve)."""
    t, e = cfg["train"], cfg["eval"]
    rule, eval_every, log_every = StopRule.from_config(t), e.get("every_steps"), int(t["log_every"])
    bar = _Progress(bool(t.get("progress", True)), rule.total_steps)
    with guard.critical():
        timer.compile([], [(int(e["batch_size"]), int(e["window"]))])
    summary.other_cpu_before = monitor.since_mark()
    timer.start()
    if eval_every and rule.total_steps != 0:
        evaluate_now(p, guard)
    try:
        while (reason := rule.before_epoch(p)) is None:
            for batch in setup.layout.epoch(setup.dataset.train, p.epoch):
                if (reason := rule.before_step(p, timer.elapsed())) is not None:
                    return reason
                with guard.critical():                     # a step and its row: all or nothing
                    _fit_rows(backend, batch)
                    loss, dt, timed = timer.step(batch)
                    writer.step((p.step + 1, p.epoch, f"{loss:.6f}", batch.valid_tokens, batch.total_slots,
                                 f"{dt:.6f}", f"{timer.elapsed():.6f}", int(timed)))
                    p.step, p.loss = p.step + 1, loss
                    p.valid, p.slots = p.valid + batch.valid_tokens, p.slots + batch.total_slots
                if not math.isfinite(loss):
                    raise Diverged(f"training loss became {loss} at step {p.step}; lower train.lr or set "
                                   f"train.clip_norm")
                if eval_every and p.step % int(eval_every) == 0:
                    evaluate_now(p, guard)
                if p.step % log_every == 0:
                    bar.update(log_every, loss=f"{loss:.3f}", tok_s=f"{timer.rate():,.0f}")
                    _fill(summary, p, timer, backend, "running")
                    with guard.critical():
                        writer.summary(summary)
            else:
                p.epoch += 1
        return reason
    finally:
        bar.close()
        summary.other_cpu_during = monitor.since_mark()


def _fit_rows(backend: Backend, batch: Any) -> None:
    """Batches of a varying row count (``max_tokens``) start every row from zero: give the backend
    a zero state of that many rows. Anything else must keep the row count (rows are streams)."""
    rows = batch.x.shape[0]
    if rows != backend.batch_size:
        if not batch.reset[:, 0].all():
            raise ValueError(f"a batch of {rows} rows follows one of {backend.batch_size} without resetting every "
                             f"row: rows carry state, so a layout may change their count only at a full reset")
        backend.reset_state(rows)


def _finish_after(exc: BaseException, summary: RunSummary, p: Progress, timer: Optional[StepTimer],
                  backend: Optional[Backend], writer: RunWriter) -> None:
    """Record how the run ended (status, error) and keep what can be kept: the last completed
    step's weights after a stop signal. A second failure here does not hide the first."""
    if isinstance(exc, Stopped):
        status, error = exc.status, None
    elif isinstance(exc, KeyboardInterrupt):    # in-process use without a StopGuard (notebooks, tests)
        status, error = "interrupted", None
    elif isinstance(exc, Diverged):
        status, error = "diverged", str(exc)
    else:
        status = "failed"
        error = str(exc) if isinstance(exc, WriteError) else f"{type(exc).__name__}: {_first_line(exc)}"
    _fill(summary, p, timer, backend, status, status if status != "failed" else "error")
    summary.error = error
    try:
        if status in ("interrupted", "terminated") and backend is not None:
            writer.weights(backend.get_weights())
        writer.summary(summary)
    except (WriteError, OSError):
        pass


def _fill(summary: RunSummary, p: Progress, timer: Optional[StepTimer], backend: Optional[Backend],
          status: str, reason: Optional[str] = None) -> None:
    summary.update(status=status, stop_reason=reason, steps=p.step, epochs_done=p.epoch, valid_tokens=p.valid,
                   total_slots=p.slots, pad_fraction=p.pad_fraction, train_loss_last=p.loss,
                   finished_at=_now(), load_avg_end=_load_avg(), **(timer.fields() if timer else {}),
                   **_peak_memory(backend))
    summary.busy = is_busy(summary.other_cpu_during) if summary.other_cpu_during is not None else None


def _process_identity() -> Dict[str, Any]:
    me = rundir.identity()
    return {"process_id": me["pid"], "parent_process_id": os.getppid(), "host": me["host"],
            "process_start_ticks": me["start_ticks"]}


def _framework_version(backend: Backend, name: str) -> str:
    versions = backend.versions()
    return versions.get(name) or next(iter(versions.values()), "")


def _header(s: RunSummary, setup: Setup) -> str:
    return (f"resetbench | backend={s.backend} kernel={s.kernel} device={s.device} | strategy={s.strategy} "
            f"B={setup.batch_size} T={setup.window} | data={s.data} ({len(setup.dataset.train)} train / "
            f"{len(setup.dataset.eval)} eval sequences, hash {s.data_hash})\n"
            f"env | {s.host_cpu} x{s.host_cores} | python {s.python_version} | numpy {s.numpy_version} | "
            f"{s.backend} {s.framework_version} | process {s.process_id}")


def _warn_if_busy(s: RunSummary, echo: Callable[[str], None]) -> None:
    if s.busy or is_busy(s.other_cpu_before):
        echo(f"warning: other processes used {s.other_cpu_before or 0:.2f} cores while this run set up and "
             f"{s.other_cpu_during or 0:.2f} during its timed steps (of {s.host_cores}): its timings are not "
             f"reliable (busy: {str(bool(s.busy)).lower()} in summary.json)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _load_avg() -> Optional[float]:
    """1-minute load average: a busy machine makes timings unreliable; this shows it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _peak_memory(backend: Optional[Backend]) -> Dict[str, Any]:
    """Peak device memory on an accelerator, else this process's peak resident memory."""
    device_peak = backend.peak_memory_bytes() if backend is not None else None
    if device_peak is not None:
        return {"peak_mem_bytes": int(device_peak), "peak_mem_kind": "device"}
    return {"peak_mem_bytes": peak_rss_bytes(), "peak_mem_kind": "host_rss"}


class _Progress:
    """A tqdm bar on stderr when available and enabled; silent otherwise."""

    def __init__(self, enabled: bool, total: Optional[int]):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr,
                                mininterval=0.5, leave=False, disable=None)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def format_summary(s: Mapping[str, Any], out_dir: str) -> str:
    """The short table printed at the end of a run."""
    rows = [
        ("steps", f"{s['steps']} ({s['stop_reason']})"),
        ("valid tokens", f"{s['valid_tokens']:,} of {s['total_slots']:,} slots, pad {_fmt(s['pad_fraction'], '.1%')}"),
        ("valid tokens/s", f"{_fmt(s['valid_tokens_per_s'], ',.0f')} over {s['timed_steps']} timed steps "
                           f"({s['train_time_s']:.2f} s; compile+warm-up {s['compile_time_s']:.2f} s)"),
        ("train loss", f"{_fmt(s['train_loss_last'], '.4f')} (last step)"),
        ("eval loss", f"{_fmt(s['eval_loss'], '.4f')} nats/token = {_fmt(s['eval_bits_per_byte'], '.4f')} "
                      f"bits/byte over {_fmt(s['eval_tokens'], ',')} tokens"),
        ("peak memory", f"{s['peak_mem_bytes'] / 2**20:,.0f} MiB ({s['peak_mem_kind']})"),
        ("harness overhead", f"{_fmt(s['harness_overhead_fraction'], '.2%')} of training wall time"),
        ("machine", "busy: other processes shared the cores" if s.get("busy") else "quiet"),
        ("results", out_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
