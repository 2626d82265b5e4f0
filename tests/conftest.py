"""One framework per pytest process.

Two frameworks in one process can crash depending on which was imported first, so a test session
never mixes them. A test belongs to a framework's group when it is parametrized with a backend
name (``torch``, ``jax:scan``, ...: the backends of ``conf/backend/`` that need more than NumPy)
or lives in ``test_<backend>.py`` / ``test_<backend>_*.py``; everything else is framework-free.

``pytest`` with tests of several groups collected runs the framework-free tests itself (test
modules of a framework are not even imported there), then one ``pytest ... --framework=<name>``
child per framework group, and fails if any child failed. ``--framework=<name>`` (or ``none``)
runs one group in this process. A guard fails any test after which this process has loaded the
modules of two backends.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
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
    yield
    config = session.config
    children = sorted(getattr(config, "_framework_children", ()))
    if config.getoption("--framework") is not None or not children or config.option.collectonly:
        return
    if session.testsfailed and config.getoption("maxfail", 0) == 1:
        return
    config._framework_results = [_run_child(config, g) for g in children]


def _run_child(config, group: str):
    """``pytest <the same arguments> --framework=<group>`` in a fresh process, output streamed."""
    args = [a for a in config.invocation_params.args if not a.startswith("--framework")]
    cmd = [sys.executable, "-m", "pytest", *args, f"--framework={group}"]
    print(f"\n---- framework {group}: {shlex.join(cmd[1:])}", flush=True)
    last = ""
    proc = subprocess.Popen(cmd, cwd=str(config.invocation_params.dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.strip():
            last = line.strip()
    code = proc.wait()
    return group, code, last


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
