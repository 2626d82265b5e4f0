"""One framework per pytest process.

Two frameworks in one process can crash depending on which was imported first, so a test session
never mixes them. A test belongs to a framework's group when it is parametrized with a backend
name (``torch``, ``jax:scan``, ...: the backends of ``conf/backend/`` that need more than NumPy)
or lives in ``test_<backend>.py`` / ``test_<backend>_*.py``; everything else is framework-free.

``pytest`` with tests of several groups collected runs the framework-free tests itself (test
modules of a framework are not even imported there) while one ``pytest ... --framework=<name>``
child per framework group runs after another in the background; it prints their output at the end
and fails if any child failed. ``--framework=<name>`` (or ``none``)
runs one group in this process. A guard fails any test after which this process has loaded the
modules of two backends.

The framework-free tests of the modules in :data:`BESIDE` form one more group, ``beside``, which
such a run hands to a child as well, after the framework groups: the framework-free tests take
longer than the framework groups together, and the two halves of the run share the cores. A group
not started by the time this process's own tests are done runs in a child started from here,
beside the others. ``--framework=none`` includes the ``beside`` tests; ``--framework=beside`` runs
them alone. The processes of such a run share a folder (:data:`SHARED_ENV`) for what several of
them would otherwise compute alike.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Dict, Optional, Set

import pytest

# The framework groups run beside the framework-free tests on a machine with few cores, and the
# tests check tiny models: OpenMP / BLAS thread pools (torch's intra-op threads, MKL, OpenBLAS) only
# spin against the other processes there (a torch test ran 3.5x slower with a busy core). One
# thread each, unless the environment sets them; set before NumPy loads, and every process the
# tests start inherits it. TensorFlow's and XLA's pools are left alone (they do not spin so).
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from benchmarks import registry  # noqa: E402

BASE_MODULES = {"numpy"}            # what every process imports anyway: no isolation needed


def _frameworks() -> Dict[str, Set[str]]:
    """Backend name -> the top-level modules it imports, for backends that need more than NumPy."""
    out = {}
    for name, cfg in registry.backend_configs().items():
        mods = set(cfg.get("requires") or []) - BASE_MODULES
        if mods:
            out[name] = mods
    return out


FRAMEWORKS = _frameworks()
_MODULE = re.compile(r"^test_(?P<name>[A-Za-z0-9]+)(_.*)?\.py$")
# framework-free modules whose tests run in a child process of their own in a full run (group
# ``beside``, taken after the framework groups): about the difference between the framework-free
# tests and the framework groups (measured on the project's 2-core machine); their framework tests
# stay in their groups
BESIDE = ("test_layout_streaming.py", "test_notebook.py")
SIDE = "beside"
# a folder that the processes of one full run share (set by the dispatching process): results that
# several framework groups compute alike are computed once (e.g. tests/test_cross_backend.py's
# torch trajectory)
SHARED_ENV = "RESETBENCH_TEST_SHARED"


def jax_cache(folder) -> Dict[str, str]:
    """Environment variables for JAX's persistent compilation cache in ``folder``, every computation
    cached (not only those that take a second to compile): for test subprocesses that check what
    they compute, not how often they compile."""
    return {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def pytest_addoption(parser):
    parser.addoption("--framework", default=None, help="run only the tests of this framework group "
                     f"({', '.join(sorted(FRAMEWORKS))}, or none: framework-free, or {SIDE}: the framework-free "
                     f"tests of {', '.join(BESIDE)}); default: every group, each in its own process")


def pytest_configure(config):
    config.addinivalue_line("markers", "framework(name): the test imports this backend's framework")
    config._framework_children = set()


def _module_group(path) -> Optional[str]:
    m = _MODULE.match(os.path.basename(str(path)))
    return m.group("name") if m and m.group("name") in FRAMEWORKS else None


def pytest_ignore_collect(collection_path, config):
    """Modules of a framework are collected only in that framework's process."""
    group = _module_group(collection_path)
    if group is None:
        return None
    wanted = config.getoption("--framework")
    if wanted is None:                      # the dispatching process: hand the module to a child
        config._framework_children.add(group)
        return True
    return True if group != wanted else None


class _OtherProcess(pytest.File):
    """A test module of a framework this process does not run: collected as empty, never imported
    (pytest does not consult ``pytest_ignore_collect`` for files named on the command line)."""

    def collect(self):
        return []


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path, parent):
    """Files named on the command line: the same rule as :func:`pytest_ignore_collect`."""
    if pytest_ignore_collect(module_path, parent.config):
        return _OtherProcess.from_parent(parent, path=module_path)
    return None


def item_group(item) -> str:
    """The framework group of a collected test (``none`` if it imports no framework; ``beside`` if
    it does not either and its module is one of :data:`BESIDE`)."""
    marker = item.get_closest_marker("framework")
    if marker is not None:
        return marker.args[0]
    group = _module_group(item.fspath)
    if group:
        return group
    callspec = getattr(item, "callspec", None)
    for value in (callspec.params.values() if callspec else ()):
        if isinstance(value, str) and value.split(":")[0] in FRAMEWORKS:
            return value.split(":")[0]
    return SIDE if os.path.basename(str(item.fspath)) in BESIDE else "none"


@pytest.hookimpl(trylast=True)          # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--framework")
    groups = {item_group(i) for i in items}
    if wanted is None:
        children = config._framework_children | (groups - {"none"})
        if not children or groups == {next(iter(children))} and not config._framework_children:
            return                          # one framework group only: run it right here
        config._framework_children = children
        keep = [i for i in items if item_group(i) == "none"]
    else:
        wanted = {wanted, SIDE} if wanted == "none" else {wanted}
        keep = [i for i in items if item_group(i) in wanted]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    """The framework groups run in child processes, one after another, while this process runs
    the framework-free tests (tests time nothing, so sharing the cores costs nothing but wall
    time); the groups not started when those are done run beside the others; their output is
    printed when they are all done."""
    config = session.config
    children = getattr(config, "_framework_children", ())
    children = sorted(children - {SIDE}) + ([SIDE] if SIDE in children else [])
    dispatch = bool(children) and config.getoption("--framework") is None and not config.option.collectonly
    runner = _Children(config, children) if dispatch else None
    if runner is not None:
        runner.start()
    yield
    if runner is not None:
        config._framework_results = runner.join()


class _Children(threading.Thread):
    """``pytest <the same arguments> --framework=<group>`` for each group, output kept: this thread
    takes the groups in turn; once this process's own tests are done, :meth:`join` takes those
    left too, so that both lines of work end about together. The processes share a folder
    (:data:`SHARED_ENV`), removed at the end."""

    def __init__(self, config, groups):
        super().__init__(daemon=True)
        self.config, self.pending, self.results = config, list(groups), {}
        self.lock = threading.Lock()
        self.shared = tempfile.mkdtemp(prefix="resetbench-tests-")
        os.environ[SHARED_ENV] = self.shared

    def _take(self) -> Optional[str]:
        with self.lock:
            return self.pending.pop(0) if self.pending else None

    def run(self) -> None:
        while (group := self._take()) is not None:
            self.results[group] = _run_child(self.config, group)

    def join(self, timeout=None):
        self.run()                      # the groups no process has started yet, here
        super().join(timeout)
        os.environ.pop(SHARED_ENV, None)
        shutil.rmtree(self.shared, ignore_errors=True)
        done = [self.results[g] for g in sorted(self.results)]
        for group, code, last, output, cmd in done:
            print(f"\n---- framework {group}: {cmd}", flush=True)
            sys.stdout.write(output)
        return [(group, code, last) for group, code, last, _, _ in done]


def _run_child(config, group: str):
    """One framework group in a fresh pytest process: (group, exit code, last line, output, command)."""
    args = [a for a in config.invocation_params.args if not a.startswith("--framework")]
    cmd = [sys.executable, "-m", "pytest", *args, f"--framework={group}"]
    proc = subprocess.run(cmd, cwd=str(config.invocation_params.dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return group, proc.returncode, (lines[-1] if lines else ""), proc.stdout, shlex.join(cmd[1:])


def pytest_sessionfinish(session, exitstatus):
    results = getattr(session.config, "_framework_results", [])
    if any(code not in (0, 5) for _, code, _ in results):     # 5: that group had no test selected
        session.exitstatus = 1
    elif exitstatus == 5 and any(code == 0 for _, code, _ in results):
        session.exitstatus = 0                                # every test ran in a child


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = getattr(config, "_framework_results", [])
    if results:
        terminalreporter.write_sep("=", "framework groups (each in its own process)")
        for group, code, last in results:
            terminalreporter.write_line(f"{group}: {last.strip('= ')} (exit {code})")


@pytest.fixture(scope="session")
def keras_worker(tmp_path_factory):
    """``keras_worker(name)``: what tests/keras_training_worker.py writes under KERAS_BACKEND=name
    (the case of tests/test_keras_backends.py, the README's Keras example first), run on first use
    and shared by test_keras_backends.py and test_keras_example.py: one Keras start per backend."""
    from tests.test_keras_backends import run_worker
    done = {}

    def get(name: str):
        if name not in done:
            done[name] = run_worker(name, tmp_path_factory.mktemp(f"keras_{name}"))
        return done[name]
    return get


@pytest.fixture(autouse=True)
def _one_framework_per_process(request):
    """Fail a test after which this process holds the modules of two backends' frameworks."""
    yield
    # all of a backend's modules: one framework may import part of another (Keras 3 imports jax)
    loaded = sorted(name for name, mods in FRAMEWORKS.items() if all(m in sys.modules for m in mods))
    if len(loaded) > 1:
        pytest.fail(f"this process has imported the frameworks of {', '.join(loaded)}: a test that imports a "
                    f"framework must be parametrized with its backend, live in test_<backend>_*.py, or carry "
                    f"@pytest.mark.framework(<backend>)", pytrace=False)
