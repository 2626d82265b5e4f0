"""The README's kernel table, generated from the kernel declarations in ``conf/backend/*.yaml``.

``python -m benchmarks.docs`` (``make docs``; ``make test`` runs it first) rewrites the part of
``README.md`` between ``<!-- kernels:start -->`` and ``<!-- kernels:end -->`` (under "## Kernels")
and nothing else: one row per declared kernel of every registered backend, with its role, the
layout properties it needs, the cells it implements and its description; the backend's default
kernel is marked. ``--check`` only reports whether the table is current (exit 1 if not).
tests/test_readme.py checks that it is.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from benchmarks import registry

README = os.path.join(registry.ROOT, "README.md")
START, END = "<!-- kernels:start -->", "<!-- kernels:end -->"
HEADER = ["| backend | kernel | role | needs | cells | description |", "|---|---|---|---|---|---|"]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip()


def backend_rows(name: str) -> List[str]:
    """The table rows of backend ``name``, one per declared kernel, in its file's order."""
    cfg = registry.backend_configs()[name]
    default = registry.default_kernel(cfg)
    rows = []
    for kernel, d in registry.kernel_decls(cfg).items():
        notes = [n for n, on in (("default", kernel == default), ("slow to build", d.slow_to_build)) if on]
        shown = f"`{kernel}`" + (f" ({', '.join(notes)})" if notes else "")
        needs = ", ".join(f"`{p}`" for p in d.needs) or "-"
        rows.append(f"| {name} | {shown} | {d.role} | {needs} | {', '.join(d.cells)} | {_cell(d.description)} |")
    return rows


def kernel_table() -> str:
    """The whole table (header and every registered backend's rows), without the markers."""
    rows = [row for name in registry.backend_configs() for row in backend_rows(name)]
    return "\n".join(HEADER + rows)


def table_block(text: str) -> str:
    """What ``text`` (a README) holds between the markers (ValueError if they are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {START} ... {END} block under '## Kernels'")
    return text[start + len(START):end].strip("\n")


def render(text: str) -> str:
    """``text`` with the table between the markers replaced by the current one."""
    table_block(text)                                   # the markers must be there
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{kernel_table()}\n{END}{rest.split(END, 1)[1]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.docs", description=__doc__.split("\n")[0])
    ap.add_argument("--readme", default=README, help="the README to update (default: the checkout's)")
    ap.add_argument("--check", action="store_true", help="only report whether the table is current")
    args = ap.parse_args(argv)
    with open(args.readme) as fh:
        text = fh.read()
    try:
        new = render(text)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{os.path.relpath(args.readme)}: the kernel table is current")
        return 0
    if args.check:
        print(f"{os.path.relpath(args.readme)}: the kernel table is stale; run make docs", file=sys.stderr)
        return 1
    tmp = f"{args.readme}.tmp"
    with open(tmp, "w") as fh:
        fh.write(new)
    os.replace(tmp, args.readme)
    print(f"{os.path.relpath(args.readme)}: kernel table rewritten from conf/backend/*.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
