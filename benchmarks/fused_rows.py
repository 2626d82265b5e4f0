"""What a row costs PyTorch's fused LSTM: forward + backward time per row and time step against B.

The ``fused`` kernel pays one step of the fused op for each mid-window reset; whether packing the
pieces between resets into more rows (fewer steps) or into the same rows (more steps) is cheaper
depends on how that op's time grows with the rows. ``python -m benchmarks.fused_rows`` times
``torch._VF.lstm`` (the op behind ``nn.LSTM``: oneDNN on a CPU, cuDNN on a GPU) forward and
backward at H = 256 and 512 over B = 32 .. 512 (T = 32, input size H + 2 as in the rewrite), in
interleaved rounds, and prints the median microseconds per row and step with the environment.
Imports torch in this process only (it is a benchmark of that op, not part of the harness).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Dict, List, Sequence, Tuple

from benchmarks.env import environment, tune_malloc


def parse_ints(text: str, name: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"fused_rows: --{name}={text!r}: expected positive integers separated by commas")
    return values


def main(argv: Sequence[str] = ()) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,512", help="H values (comma-separated)")
    ap.add_argument("--rows", default="32,64,128,256,512", help="B values (comma-separated)")
    ap.add_argument("--steps", type=int, default=32, help="T, time steps per call")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = ap.parse_args(list(argv) or None)
    hidden, rows = parse_ints(args.hidden, "hidden"), parse_ints(args.rows, "rows")
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit(f"fused_rows: --steps={args.steps} --rounds={args.rounds}: both must be at least 1")
    tune_malloc()
    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    cases: Dict[Tuple[int, int], tuple] = {}
    for H in hidden:
        w = [(torch.randn(4 * H, H + 2, generator=g) / H ** 0.5).to(dev).requires_grad_(),
             (torch.randn(4 * H, H, generator=g) / H ** 0.5).to(dev).requires_grad_(),
             torch.zeros(4 * H, device=dev, requires_grad=True), torch.zeros(4 * H, device=dev, requires_grad=True)]
        for B in rows:
            x = torch.randn(B, args.steps, H + 2, generator=g).to(dev).requires_grad_()
            state = (torch.zeros(1, B, H, device=dev), torch.zeros(1, B, H, device=dev))
            cases[(H, B)] = (x, state, w)

    def once(x, state, w) -> float:
        sync()
        t0 = time.perf_counter()
        out, _, _ = torch._VF.lstm(x, state, w, True, 1, 0.0, True, False, True)
        out.sum().backward()
        sync()
        return time.perf_counter() - t0

    times: Dict[Tuple[int, int], List[float]] = {k: [] for k in cases}
    for case in cases.values():
        once(*case)                                            # warm-up: primitives, allocations
    for _ in range(args.rounds):
        for key, case in cases.items():
            times[key].append(once(*case))
    env = dict(environment(), torch_version=torch.__version__, load_average=list(os.getloadavg()))
    print(json.dumps(env))
    print(f"torch._VF.lstm forward + backward, T={args.steps}, device {dev.type}, median of {args.rounds} rounds")
    for H in hidden:
        base = None
        for B in rows:
            us = statistics.median(times[(H, B)]) / (B * args.steps) * 1e6
            base = base or us
            print(f"H={H} B={B}: {us:.2f} us per row-step ({us / base:.2f}x B={rows[0]}'s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
