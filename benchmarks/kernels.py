"""Kernel micro-benchmark: a backend's reset-aware train step vs the framework's native LSTM.

``python -m benchmarks.kernels [--batch 32 --window 64 --hidden 256 --reset-density 0.03]``
times, in one process and interleaved, a full training step (forward, backward, Adam update) of
the torch reset-aware kernels (``loop``, ``script``) and of plain ``torch.nn.LSTM`` without resets
(the fused ATen kernel, which cannot reset per row) on the same batch shape, and prints median
valid tokens/s and the ratio. The environment is printed first. Speed lives here, never in tests.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import numpy as np

from backends.base import Batch, ModelSpec, OptimizerSpec, init_weights
from benchmarks.env import environment


def random_batch(B: int, T: int, density: float, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    reset = rng.random((B, T)) < density
    return Batch(rng.integers(0, 257, (B, T)).astype(np.int32), rng.integers(0, 257, (B, T)).astype(np.int32),
                 np.ones((B, T), np.float32), reset)


def native_torch_step(spec: ModelSpec, B: int, T: int, threads=None) -> Callable[[Batch], float]:
    """``nn.Embedding -> nn.LSTM -> nn.Linear`` with Adam: the framework's fastest no-reset path."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    emb = torch.nn.Embedding(spec.vocab, spec.embed)
    lstm = torch.nn.LSTM(spec.embed, spec.hidden, spec.layers, batch_first=True)
    head = torch.nn.Linear(spec.hidden, spec.vocab)
    params = [*emb.parameters(), *lstm.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    state = [torch.zeros(spec.layers, B, spec.hidden), torch.zeros(spec.layers, B, spec.hidden)]

    def step(batch: Batch) -> float:
        x = torch.from_numpy(batch.x)
        y = torch.from_numpy(batch.y).long()
        opt.zero_grad(set_to_none=True)
        out, (h, c) = lstm(emb(x), (state[0], state[1]))
        state[0], state[1] = h.detach(), c.detach()
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, spec.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())
    return step


def time_steps(step: Callable[[Batch], float], batch: Batch, warmup: int, repeats: int) -> List[float]:
    for _ in range(warmup):
        step(batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(batch)          # float(loss) inside: the step has finished on the device
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> Dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--reset-density", type=float, default=0.03)
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per kernel and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (noise control)")
    ap.add_argument("--kernels", default="loop,script,native")
    args = ap.parse_args(argv)
    env = environment()
    import torch
    print(f"env | {env['host_cpu']} x{env['host_cores']} | python {env['python_version']} | "
          f"numpy {env['numpy_version']} | torch {torch.__version__} (threads {torch.get_num_threads()})")
    spec = ModelSpec(args.embed, args.hidden, 1)
    B, T = args.batch, args.window
    batch = random_batch(B, T, args.reset_density)
    steps: Dict[str, Callable[[Batch], float]] = {}
    for k in args.kernels.split(","):
        if k == "native":
            steps["torch.nn.LSTM (no resets)"] = native_torch_step(spec, B, T)
        else:
            from backends.torch_lstm import TorchBackend
            be = TorchBackend(spec, init_weights(spec, 0), OptimizerSpec("adam", 1e-3), B, "cpu", kernel=k)
            steps[f"torch.{k} (resets {args.reset_density:.0%})"] = lambda b, be=be: float(be.train_step(b))
    samples: Dict[str, List[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            samples[name] += time_steps(step, batch, 2, args.repeats)
    tokens = B * T
    rates = {name: tokens / statistics.median(ts) for name, ts in samples.items()}
    best_native = max((r for n, r in rates.items() if "no resets" in n), default=None)
    print(f"B={B} T={T} E={args.embed} H={args.hidden}: median valid tokens/s of a full train step "
          f"({args.rounds} x {args.repeats} steps each)")
    for name, rate in rates.items():
        ratio = f"  {rate / best_native:.2f}x native" if best_native else ""
        print(f"  {name:<32} {rate:>10,.0f}{ratio}")
    return rates


if __name__ == "__main__":
    main()
