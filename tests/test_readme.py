"""README stays true: its two set-up commands exist in the Makefile, each layer example (Keras,
torch, JAX) is the one a test runs, .ci/run calls the README's test command, and the kernel table
is the one ``python -m benchmarks.docs`` generates from ``conf/backend/*.yaml`` (one test per
backend, so ``pytest -k <backend>`` selects it)."""

from __future__ import annotations

import os
import re

import pytest

from benchmarks import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as fh:
        return fh.read()


def test_first_commands_are_make_targets_and_ci_uses_the_test_one():
    readme = read("README.md")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make bench", "make test"]
    makefile = read("Makefile")
    assert re.search(r"^bench:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in read(".ci", "run")


@pytest.mark.parametrize("test_file", ["test_keras_example.py", "test_torch_layer.py", "test_jax_layers.py"])
def test_layer_example_in_readme_is_the_tested_one(test_file):
    """Each layer example in the README is, line for line, the one a framework test runs."""
    test = read("tests", test_file)
    assert test.count("# --- README example start ---") == 1, f"{test_file}: one marked README example"
    snippet = test.split("# --- README example start ---\n")[1].split("# --- README example end ---")[0]
    indent = min(len(line) - len(line.lstrip()) for line in snippet.splitlines() if line.strip())
    code = "\n".join(line[indent:] for line in snippet.rstrip().splitlines()).strip()
    blocks = re.findall(r"```python\n(.*?)```", read("README.md"), re.S)
    assert any(code in block for block in blocks), f"README.md: no python block holds the example of {test_file}"


def _table_rows() -> list:
    from benchmarks import docs
    return docs.table_block(read("README.md")).splitlines()


@pytest.mark.parametrize("backend", sorted(registry.backend_configs()))
def test_readme_kernel_table_is_current(backend):
    """The README's kernel table (between the kernels:start/end markers under "## Kernels") has
    exactly the rows ``python -m benchmarks.docs`` writes for this backend, from its yaml file."""
    from benchmarks import docs
    assert "## Kernels" in read("README.md").split(docs.START)[0], "the kernel table belongs under ## Kernels"
    expected = docs.backend_rows(backend)
    table = _table_rows()
    assert table[:2] == docs.HEADER, "README.md kernel table: the header is stale; run make docs"
    have = [row for row in table if row.startswith(f"| {backend} |")]
    missing = [row for row in expected if row not in have]
    stale = [row for row in have if row not in expected]
    assert not missing and not stale and have == expected, (
        f"README.md kernel table, backend {backend}: "
        + (f"missing row {missing[0]!r}; " if missing else "")
        + (f"stale row {stale[0]!r}; " if stale else "")
        + ("rows out of order; " if not missing and not stale else "")
        + "run make docs (python -m benchmarks.docs) to rewrite it from conf/backend/*.yaml")


def test_readme_kernel_table_has_no_unregistered_backend():
    rows = _table_rows()[2:]
    names = {row.split("|")[1].strip() for row in rows}
    assert names <= set(registry.backend_configs()), (
        f"README.md kernel table: rows of {sorted(names - set(registry.backend_configs()))}, which have no "
        f"conf/backend file; run make docs")


def test_docs_rewrites_only_the_table(tmp_path):
    """``python -m benchmarks.docs`` replaces a stale table between the markers, leaves the rest
    of the file alone, and ``--check`` reports a stale table with exit 1."""
    from benchmarks import docs
    stale = "intro\n## Kernels\n\n" + docs.START + "\n| backend | old |\n" + docs.END + "\n\nafter\n"
    path = tmp_path / "README.md"
    path.write_text(stale)
    assert docs.main(["--readme", str(path), "--check"]) == 1
    assert path.read_text() == stale
    assert docs.main(["--readme", str(path)]) == 0
    text = path.read_text()
    assert text.startswith("intro\n## Kernels\n\n" + docs.START + "\n") and text.endswith(docs.END + "\n\nafter\n")
    assert docs.table_block(text) == docs.kernel_table()
    assert docs.main(["--readme", str(path), "--check"]) == 0
    path.write_text("no markers\n")
    assert docs.main(["--readme", str(path)]) == 2
