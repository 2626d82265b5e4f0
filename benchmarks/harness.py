"""The benchmark loop: data -> layout -> backend; warm-up, timed steps, evaluation, result files.

The harness imports no framework: the backend is built through :mod:`benchmarks.registry`
after every config value, data file and weight file has been checked. Timing follows
CONTRACT section 4: the device is synchronized before every clock read; compilation
(``Backend.precompile``) and the untimed warm-up steps are reported as ``compile_time_s``;
evaluation time is excluded from training time.

Files (CONTRACT section 6), written so an interrupted run leaves valid files behind:
``steps.csv`` (one row per step, appended and flushed), ``evals.csv`` (periodic evaluations),
``summary.json`` (rewritten atomically every ``train.log_every`` steps and at the end, with a
``status``), ``weights.npz`` (final canonical weights).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, IO, List, Mapping, Optional, Tuple

import numpy as np

from backends.base import Backend, init_weights, load_weights, save_weights
from benchmarks import registry
from benchmarks.config import model_spec, optimizer_spec, strategy_options, validate
from benchmarks.data import Dataset, load_dataset
from benchmarks.env import environment, peak_rss_bytes, reset_peak_rss, tune_malloc
from benchmarks.strategies import Epoch, eval_batches, make_layout

STEP_COLUMNS = ("step", "epoch", "loss", "valid_tokens", "total_slots", "step_time_s", "elapsed_s", "timed")
EVAL_COLUMNS = ("step", "valid_tokens_seen", "elapsed_s", "eval_loss", "eval_tokens", "eval_time_s")


class Diverged(RuntimeError):
    """The training loss became NaN or inf."""


class RunWriter:
    """Owns the run directory's files; every write leaves them valid."""

    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir = out_dir
        self._steps = self._open_csv("steps.csv", STEP_COLUMNS)
        self._evals = self._open_csv("evals.csv", EVAL_COLUMNS)

    def _open_csv(self, name: str, columns) -> Tuple[IO[str], Any]:
        fh = open(os.path.join(self.out_dir, name), "w", newline="")
        writer = csv.writer(fh)
        writer.writerow(columns)
        fh.flush()
        return fh, writer

    def _append(self, target, row) -> None:
        fh, writer = target
        writer.writerow(row)
        fh.flush()

    def step(self, row) -> None:
        self._append(self._steps, row)

    def eval(self, row) -> None:
        self._append(self._evals, row)

    def summary(self, summary: Mapping[str, Any]) -> None:
        path = os.path.join(self.out_dir, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=2, sort_keys=True, default=_json_default)
            fh.write("\n")
        os.replace(tmp, path)

    def weights(self, weights: Mapping[str, np.ndarray]) -> None:
        save_weights(os.path.join(self.out_dir, "weights.npz"), weights)

    def close(self) -> None:
        for fh, _ in (self._steps, self._evals):
            fh.close()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return str(obj)


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


def run(cfg: Mapping[str, Any], out_dir: str, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` (a plain dict of the composed config) says; write the run
    files into ``out_dir``; return the summary. User errors raise ConfigError before any
    framework import; a NaN/inf loss raises :class:`Diverged` after writing the files."""
    validate(cfg)
    peak_is_per_run = reset_peak_rss()
    t_cfg, e_cfg = cfg["train"], cfg["eval"]
    seed = int(t_cfg["seed"])
    spec, opt = model_spec(cfg), optimizer_spec(cfg)
    dataset: Dataset = load_dataset(cfg["data"], seed)
    B, T = int(t_cfg["batch_size"]), int(t_cfg["window"])
    layout = make_layout(cfg["strategy"]["name"], B, T, seed, **strategy_options(cfg))
    init = cfg["model"].get("init")
    weights = load_weights(init, spec) if init else init_weights(spec, seed)
    bcfg = dict(cfg["backend"])
    registry.check_installed(bcfg)                     # before the heavy import
    eval_epoch = eval_batches(dataset.eval, int(e_cfg["batch_size"]), int(e_cfg["window"]))

    if cfg.get("tune_malloc", True):
        tune_malloc()
    backend = registry.build_backend(bcfg, spec, weights, opt, B, device=cfg["device"])
    env = {**environment(), **{f"{k}_version": v for k, v in backend.versions().items()}}
    framework = backend.versions().get(bcfg["name"]) or next(iter(backend.versions().values()), "")
    echo(f"resetbench | backend={bcfg['name']} kernel={backend.kernel} device={backend.device} | "
         f"strategy={layout.name} B={B} T={T} | data={dataset.name} ({len(dataset.train)} train / "
         f"{len(dataset.eval)} eval sequences, hash {dataset.content_hash})")
    echo(f"env | {env['host_cpu']} x{env['host_cores']} | python {env['python_version']} | "
         f"numpy {env['numpy_version']} | {bcfg['name']} {framework}")

    writer = RunWriter(out_dir)
    steps_limit = t_cfg.get("steps")
    steps_limit = math.inf if steps_limit is None else int(steps_limit)
    epochs_limit = t_cfg.get("epochs")
    budget = t_cfg.get("time_budget_s")
    token_budget = t_cfg.get("max_valid_tokens")
    warmup = int(t_cfg["warmup_steps"])
    eval_every = e_cfg.get("every_steps")
    log_every = int(t_cfg["log_every"])

    summary: Dict[str, Any] = {
        "status": "running", "backend": bcfg["name"], "strategy": layout.name, "data": dataset.name,
        "kernel": backend.kernel, "device": backend.device, "seed": seed,
        "batch_size": B, "window": T, "embed": spec.embed, "hidden": spec.hidden, "layers": spec.layers,
        "optimizer": opt.name, "lr": opt.lr, "clip_norm": opt.clip_norm,
        "framework_version": framework, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_avg_start": _load_avg(), "peak_mem_per_run": peak_is_per_run,
        **env, **dataset.summary(), "config": cfg,
    }
    acc = {"step": 0, "epoch": 0, "valid": 0, "slots": 0, "timed_steps": 0, "timed_valid": 0,
           "timed_time": 0.0, "step_time": 0.0, "compile": 0.0, "excluded": 0.0, "loss": None,
           "eval_time": 0.0}
    step_times: List[float] = []     # timed steps only
    step_rates: List[float] = []     # their valid tokens / s
    loop_t0 = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - loop_t0 - acc["excluded"]

    def fill(status: str, stop_reason: Optional[str] = None) -> Dict[str, Any]:
        train_elapsed = elapsed()
        timed_time = acc["timed_time"]
        summary.update({
            "status": status, "stop_reason": stop_reason, "steps": acc["step"], "epochs_done": acc["epoch"],
            "valid_tokens": acc["valid"], "total_slots": acc["slots"],
            "pad_fraction": (1.0 - acc["valid"] / acc["slots"]) if acc["slots"] else None,
            "warmup_steps": min(warmup, acc["step"]), "timed_steps": acc["timed_steps"],
            "timed_valid_tokens": acc["timed_valid"], "train_time_s": timed_time,
            "train_wall_s": train_elapsed, "compile_time_s": acc["compile"],
            "valid_tokens_per_s": (acc["timed_valid"] / timed_time) if timed_time > 0 else None,
            "step_time_median_s": float(np.median(step_times)) if step_times else None,
            "valid_tokens_per_s_median": float(np.median(step_rates)) if step_rates else None,
            "train_loss_last": acc["loss"],
            "harness_overhead_fraction": (max(train_elapsed - acc["step_time"], 0.0) / train_elapsed)
            if acc["step"] and train_elapsed > 0 else None,
            **_peak_memory(backend),
            "eval_time_s": acc["eval_time"],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg_end": _load_avg(),
        })
        return summary

    def do_eval() -> Tuple[float, int]:
        t0 = time.perf_counter()
        loss, count = evaluate(backend, eval_epoch)
        backend.synchronize()
        dt = time.perf_counter() - t0
        acc["excluded"] += dt
        acc["eval_time"] += dt
        writer.eval((acc["step"], acc["valid"], f"{elapsed():.6f}", f"{loss:.6f}", count, f"{dt:.4f}"))
        return loss, count

    def compile_shapes(train_shapes, eval_shapes=()) -> None:
        """Ahead-of-time compilation, counted as compile time and kept off the training clock."""
        t0 = time.perf_counter()
        backend.precompile(list(train_shapes), list(eval_shapes))
        backend.synchronize()
        dt = time.perf_counter() - t0
        acc["compile"] += dt
        acc["excluded"] += dt

    compile_shapes([], [(int(e_cfg["batch_size"]), int(e_cfg["window"]))])
    compiled = set()
    total = None if steps_limit == math.inf else int(steps_limit)
    progress = _Progress(bool(t_cfg.get("progress", True)), total)
    stop_reason: Optional[str] = None
    writer.summary(fill("running"))
    try:
        while stop_reason is None:
            if epochs_limit is not None and acc["epoch"] >= int(epochs_limit):
                stop_reason = "epochs"
                break
            if acc["step"] >= steps_limit:
                stop_reason = "steps"
                break
            epoch = layout.epoch(dataset.train, acc["epoch"])
            for batch in epoch:
                if acc["step"] >= steps_limit:
                    stop_reason = "steps"
                    break
                if budget is not None and elapsed() >= float(budget):
                    stop_reason = "time_budget"
                    break
                if token_budget is not None and acc["valid"] >= int(token_budget):
                    stop_reason = "token_budget"
                    break
                if batch.shape not in compiled:      # a new shape: compile it outside the clock
                    compile_shapes([batch.shape])
                    compiled.add(batch.shape)
                t0 = time.perf_counter()
                loss_value = backend.train_step(batch)
                backend.synchronize()
                loss = float(loss_value)
                dt = time.perf_counter() - t0
                timed = acc["step"] >= warmup
                valid, slots = batch.valid_tokens, batch.total_slots
                acc["step"] += 1
                acc["valid"] += valid
                acc["slots"] += slots
                acc["step_time"] += dt
                acc["loss"] = loss
                if timed:
                    acc["timed_steps"] += 1
                    acc["timed_valid"] += valid
                    acc["timed_time"] += dt
                    step_times.append(dt)
                    step_rates.append(valid / dt if dt > 0 else 0.0)
                else:
                    acc["compile"] += dt
                writer.step((acc["step"], acc["epoch"], f"{loss:.6f}", valid, slots, f"{dt:.6f}",
                             f"{elapsed():.6f}", int(timed)))
                if not math.isfinite(loss):
                    raise Diverged(f"training loss became {loss} at step {acc['step']}; "
                                   f"lower train.lr or set train.clip_norm")
                if eval_every and acc["step"] % int(eval_every) == 0:
                    do_eval()
                if acc["step"] % log_every == 0:
                    rate = acc["timed_valid"] / acc["timed_time"] if acc["timed_time"] else 0.0
                    progress.update(log_every, loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    writer.summary(fill("running"))
            else:
                acc["epoch"] += 1
                continue
    except BaseException as exc:           # leave valid files behind, then re-raise
        progress.close()
        status = {Diverged: "diverged", KeyboardInterrupt: "interrupted"}.get(type(exc), "failed")
        final = fill(status, "error" if status == "failed" else status)
        if status == "failed":
            final["error"] = f"{type(exc).__name__}: {exc}"
        writer.summary(final)
        if status == "interrupted":
            writer.weights(backend.get_weights())
        writer.close()
        raise
    progress.close()
    eval_loss, eval_tokens = do_eval()
    writer.weights(backend.get_weights())
    result = fill("completed", stop_reason)
    result.update({"eval_loss": eval_loss, "eval_tokens": eval_tokens,
                   "eval_bits_per_byte": eval_loss / math.log(2)})
    writer.summary(result)
    writer.close()
    echo(format_summary(result, out_dir))
    return result


def _load_avg() -> Optional[float]:
    """1-minute load average: a busy machine makes timings unreliable; this shows it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _peak_memory(backend: Backend) -> Dict[str, Any]:
    """Peak device memory on an accelerator, else the process's peak resident memory."""
    device_peak = backend.peak_memory_bytes()
    if device_peak is not None:
        return {"peak_mem_bytes": int(device_peak), "peak_mem_kind": "device"}
    return {"peak_mem_bytes": peak_rss_bytes(), "peak_mem_kind": "host_rss"}


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
        ("eval loss", f"{s['eval_loss']:.4f} nats/token = {s['eval_bits_per_byte']:.4f} bits/byte "
                      f"over {s['eval_tokens']:,} tokens"),
        ("peak memory", f"{s['peak_mem_bytes'] / 2**20:,.0f} MiB ({s['peak_mem_kind']})"),
        ("harness overhead", f"{_fmt(s['harness_overhead_fraction'], '.2%')} of training wall time"),
        ("results", out_dir),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
