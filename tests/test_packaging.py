"""Installing the project: a wheel holds the library only (``resetbench``: layers and packing loader),
no generic top-level package such as ``backends`` or ``benchmarks``, and its layers import from
outside the checkout."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import SHARED_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = {"torch": "resetbench.torch_layers", "jax": "resetbench.jax_layers", "keras": "resetbench.keras_layers"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel and installed (``pip install --target``) into a folder: once
    per test process, or once per run where the run's processes share a folder (tests/conftest.py;
    the first to get there builds, the others wait for it)."""
    shared = os.environ.get(SHARED_ENV)
    tmp = Path(shared) / "wheel" if shared else tmp_path_factory.mktemp("wheel")
    tmp.mkdir(exist_ok=True)
    target = tmp / "site"
    with open(tmp / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (tmp / "installed").exists():
            r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                                "-w", str(tmp / "dist"), ROOT], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            (wheel,) = list((tmp / "dist").glob("resetbench-*.whl"))
            r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr[-2000:]
            (tmp / "installed").touch()
    (wheel,) = list((tmp / "dist").glob("resetbench-*.whl"))
    return wheel, target


def test_wheel_holds_only_the_resetbench_package(installed):
    wheel, target = installed
    with zipfile.ZipFile(wheel) as z:
        top = {name.split("/")[0] for name in z.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"resetbench"}, top
    assert not (target / "backends").exists() and not (target / "benchmarks").exists()
    # the cpp kernel's source travels with the package (compiled on first use)
    assert (target / "resetbench" / "csrc" / "reset_lstm.cpp").exists()


def _run_outside(target, code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}        # before site-packages (and its editable install)
    return subprocess.run([sys.executable, "-c", code], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=300)


def test_packing_loader_imports_from_the_installed_package(installed, tmp_path):
    _, target = installed
    code = ("import resetbench, resetbench.layouts as L\n"
            "from resetbench.corpus import Corpus\n"
            "assert resetbench.__file__.startswith(%r), resetbench.__file__\n"
            "c = Corpus.from_sequences([b'abc', b'defgh', b'i'])\n"
            "batches = list(L.Packed(batch_size=2, window=4).epoch(c))\n"
            "assert sum(b.valid_tokens for b in batches) == 4 + 6 + 2   # n + 1 targets per sequence\n"
            "import sys; assert 'backends' not in sys.modules and 'benchmarks' not in sys.modules\n"
            "print('ok')" % str(target))
    r = _run_outside(target, code, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("framework", sorted(LAYERS))
def test_layers_import_from_the_installed_package(installed, tmp_path, framework):
    """Each framework's layer module, in a process of its own, from outside the checkout."""
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} not installed")
    _, target = installed
    module = LAYERS[framework]
    r = _run_outside(target, f"import {module} as m; assert m.__file__.startswith({str(target)!r}); "
                             f"print(m.__name__)", tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith(module), r.stderr[-2000:]
