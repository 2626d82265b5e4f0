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
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from typing import Dict, Optional, Set

import pytest

from benchmarks import registry

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


def pytest_addoption(parser):
    parser.addoption("--framework", default=None, help="run only the tests of this framework group "
                     f"({', '.join(sorted(FRAMEWORKS))}, or none: framework-free); default: every group, "
                     "each in its own process")


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
    """The framework group of a collected test (``none`` if it imports no framework)."""
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
    return "none"


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
        keep = [i for i in items if item_group(i) == wanted]
    dropped = [i for i in items if i not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    """The framework groups run in child processes, one after another, while this process runs
    the framework-free tests (tests time nothing, so sharing the cores costs nothing but wall
    time); their output is printed when they are done."""
    config = session.config
    children = sorted(getattr(config, "_framework_children", ()))
    dispatch = bool(children) and config.getoption("--framework") is None and not config.option.collectonly
    runner = _Children(config, children) if dispatch else None
    if runner is not None:
        runner.start()
    yield
    if runner is not None:
        config._framework_results = runner.join()


class _Children(threading.Thread):
    """``pytest <the same arguments> --framework=<group>`` for each group, in turn, output kept."""

    def __init__(self, config, groups):
        super().__init__(daemon=True)
        self.config, self.groups, self.results = config, groups, []

    def run(self) -> None:
        for group in self.groups:
            self.results.append(_run_child(self.config, group))

    def join(self, timeout=None):
        super().join(timeout)
        for group, code, last, output, cmd in self.results:
            print(f"\n---- framework {group}: {cmd}", flush=True)
            sys.stdout.write(output)
        return [(group, code, last) for group, code, last, _, _ in self.results]


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
