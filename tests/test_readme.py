"""README stays true: its two set-up commands exist in the Makefile, the Keras example is the one
the tests run, and .ci/run calls the README's test command."""

from __future__ import annotations

import os
import re

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


def test_keras_example_in_readme_is_the_tested_one():
    readme = read("README.md")
    test = read("tests", "test_keras_example.py")
    snippet = test.split("# --- README example start ---\n")[1].split("# --- README example end ---")[0]
    lines = [line[4:] if line.startswith("    ") else line for line in snippet.rstrip().splitlines()]
    assert "\n".join(lines).strip() in readme


def test_every_declared_kernel_is_in_the_readme_kernel_table():
    from benchmarks import registry

    readme = read("README.md")
    section = readme.split("## Kernels", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("| backend |"))
    for name, cfg in registry.backend_configs().items():
        kernels = registry.kernel_options(cfg)
        if not kernels["exact"]:
            continue
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        for k in kernels["exact"]:
            assert f"`{k}`" in row, (name, k)
        assert cfg["kernel"] in row.split("|")[2].split(",")[0], f"{name}: default kernel listed first"
