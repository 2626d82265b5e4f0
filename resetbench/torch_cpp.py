"""The ``cpp`` kernel: the LSTM's time loop in C++ with the reset inside the step (CPU, float32).

The ``rewrite`` kernel (oneDNN's fused LSTM on a rewritten window) pays one extra step per
mid-window reset (about ``1 + d`` times ``nn.LSTM`` at a reset share d); the ``bptt`` loop pays
Python and ATen overhead on every step. This kernel (what ``fused`` runs on a CPU for windows
with mid-window resets) runs the loop of :class:`resetbench.torch_bptt.LstmWindow` in C++
(``csrc/reset_lstm.cpp``): per step one matmul and the gate math vectorized in one pass over the
threads, the rows that reset reading the zero state, so its cost does not depend on the reset
density. The weights' gradient is one matmul over the window, here. The per-step matmul is MKL's
packed GEMM (the recurrent weights packed once per window, as oneDNN's fused RNN does) where
torch's BLAS exports it, else ATen's matmul; :data:`PACKED_GEMM` turns the first off (the tests
run both). Measured here: the packed GEMM and the threaded gate math took the kernel from
0.78-0.84x to 0.92-1.03x ``nn.LSTM`` (layers alone, results/tables/kernels.csv).

The extension is compiled on first use on this machine (``torch.utils.cpp_extension``: a C++
compiler and ninja, about 30 s on 2 cores) into a cache folder (``RESETBENCH_CACHE``, default
``~/.cache/resetbench``), keyed by the source, the compiler flags, the CPU and torch's version,
and loaded from there afterwards. :func:`missing` says what is absent before anything is compiled.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import sysconfig
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from resetbench.torch_bptt import _carried_grad

State = Tuple[torch.Tensor, ...]
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "reset_lstm.cpp")
_EXT = None
_READY: Optional[bool] = None      # ready(): None until asked once in this process
CFLAGS = ["-O3", "-march=native", "-fopenmp"]   # OpenMP: ATen's parallel_for splits the gate math over threads
PACKED_GEMM = True      # use MKL's packed GEMM where the process has it (False: ATen's matmul each step)


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the machine and its CPU flags
    (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _ninja() -> Optional[str]:
    """The ninja program: on PATH, or the one of the ``ninja`` Python package (installed with the
    ``torch`` extra), whose folder is then put on PATH for torch's builder."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja")


def missing() -> List[str]:
    """What building the extension needs and this machine lacks (empty: it can be built)."""
    gaps = []
    if not (os.environ.get("CXX") and shutil.which(os.environ["CXX"])) and not shutil.which("c++"):
        gaps.append("a C++ compiler (c++ on PATH, or CXX)")
    if _ninja() is None:
        gaps.append("ninja (pip install ninja)")
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        gaps.append("Python's headers (Python.h)")
    return gaps


def extension():
    """The compiled extension (built on first use, then loaded from the cache folder)."""
    global _EXT
    if _EXT is None:
        gaps = missing()
        if gaps:
            raise RuntimeError(f"kernel cpp: cannot build its C++ extension here: missing {', '.join(gaps)}")
        from torch.utils.cpp_extension import load
        with open(SOURCE, "rb") as fh:
            key = hashlib.sha256(fh.read() + " ".join(CFLAGS + [_cpu_key(), torch.__version__]).encode()).hexdigest()[:16]
        folder = os.path.join(os.environ.get("RESETBENCH_CACHE", os.path.expanduser(os.path.join("~", ".cache", "resetbench"))),
                              f"reset_lstm_{key}")
        os.makedirs(folder, exist_ok=True)
        if not any(name.endswith(".so") for name in os.listdir(folder)):
            print(f"resetbench: compiling the cpp kernel's C++ extension into {folder} (once; ~30 s on 2 cores)",
                  file=sys.stderr, flush=True)
        _EXT = load(name=f"resetbench_reset_lstm_{key}", sources=[SOURCE], build_directory=folder,
                    extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False)
    return _EXT


def ready() -> bool:
    """Whether the extension can be used in this process: built (or loaded) on the first call.
    Where it cannot be built, warns once naming why and returns False, so that the ``fused``
    kernel keeps oneDNN's rewrite (``kernel=cpp`` itself refuses with a one-line error instead)."""
    global _READY
    if _READY is None:
        try:
            extension()
            _READY = True
        except Exception as err:           # no compiler, a failed build: fused keeps the rewrite
            warnings.warn(f"resetbench: kernel fused runs the LSTM through oneDNN's rewrite (about one extra "
                          f"step per mid-window reset), not the C++ loop: {str(err).splitlines()[0][:300]}")
            _READY = False
    return _READY


class LstmWindowCpp(torch.autograd.Function):
    """One LSTM layer over a window: ``(xp [T, B, 4H] = x w_x, b [4H], h0, c0 [B, H], w_h [H, 4H],
    reset [T, B] bool) -> (outputs [T, B, H], final h, final c)``, forward and backward in C++ (the
    bias is added in the gate pass, not as a pass of its own)."""

    @staticmethod
    def forward(ctx, xp, b, h0, c0, w_h, reset):
        hout, cout, tcs, gates, hins = extension().lstm_forward(xp, b, h0, c0, w_h, reset, PACKED_GEMM)
        ctx.save_for_backward(c0, hins, cout, tcs, gates, w_h, reset)
        return hout, hout[-1].clone(), cout[-1].clone()

    @staticmethod
    def backward(ctx, dout, dh_final, dc_final):
        c0, hins, cout, tcs, gates, w_h, reset = ctx.saved_tensors
        T, B, H = hins.shape
        dout = dout if dout is not None else hins.new_empty(0)
        dpre, dh0, dc0 = extension().lstm_backward(dout, _carried_grad(dh_final, c0), _carried_grad(dc_final, c0),
                                                   gates, tcs, cout, c0, w_h, reset, PACKED_GEMM)
        flat = dpre.reshape(T * B, 4 * H)
        return flat.view(T, B, 4 * H), flat.sum(0), dh0, dc0, hins.reshape(T * B, H).t() @ flat, None


def packed_gemm() -> bool:
    """Whether the per-step matmuls run through MKL's packed GEMM in this process."""
    return PACKED_GEMM and bool(extension().has_packed_gemm())


def layers_cpp(cell: str, inp: torch.Tensor, reset: torch.Tensor, state: State,
               layers: Sequence[dict]) -> Tuple[torch.Tensor, State]:
    """Every layer through :class:`LstmWindowCpp`. ``inp`` [B, T, in] float32 on the CPU,
    ``reset`` [B, T] bool tensor, ``state`` one [L, B, H] tensor per state component. Returns the
    outputs [B, T, H] and the final state."""
    if cell != "lstm":
        raise ValueError(f"layers_cpp cell={cell!r}: allowed lstm")
    if inp.device.type != "cpu" or inp.dtype != torch.float32:
        raise ValueError(f"layers_cpp: float32 tensors on the CPU only, got {inp.dtype} on {inp.device}")
    reset_tm = reset.t().contiguous().to(torch.bool)
    x = inp.transpose(0, 1)                               # time-major
    finals = []
    for layer, p in enumerate(layers):
        x, h, c = LstmWindowCpp.apply(torch.matmul(x, p["w_x"]).contiguous(), p["b"], state[0][layer],
                                      state[1][layer], p["w_h"], reset_tm)
        finals.append((h, c))
    return x.transpose(0, 1), tuple(torch.stack(parts) for parts in zip(*finals))
