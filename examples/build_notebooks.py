"""Build the example notebooks from their jupytext "percent" twins.

    python examples/build_notebooks.py           # rewrite every notebook
    python examples/build_notebooks.py --check   # exit 1 if one is out of date

A twin is a Python script (``examples/<name>.py``) cut into cells by marker
lines: ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose
lines are comments (``# text``, or ``#`` for a blank line). The twin is the
source of truth; ``examples/<name>.ipynb`` is written from it without outputs
and with cell ids numbered in order, so building twice gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

EXAMPLES = Path(__file__).resolve().parent
NOTEBOOKS = ("compare_dtypes", "energy_per_token")  # twins under examples/, without ".py"

CODE_MARKER = "# %%"
MARKDOWN_MARKER = "# %% [markdown]"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def _strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _markdown_line(line: str, where: str) -> str:
    if line == "#":
        return ""
    if not line.startswith("# "):
        raise ValueError(f"{where}: a markdown cell's lines must start with '# ' (or be '#'), "
                         f"got {line!r}")
    return line[2:]


def parse(text: str, name: str = "<twin>") -> list[tuple[str, str]]:
    """The cells of a percent-format script as ``(kind, source)`` pairs, kind
    ``"code"`` or ``"markdown"``, blank lines around each cell dropped."""
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        where = f"{name}:{number}"
        if line.startswith(MARKDOWN_MARKER):
            cells.append(("markdown", []))
        elif line == CODE_MARKER or line.startswith(CODE_MARKER + " "):
            cells.append(("code", []))
        elif not cells:
            if line.strip():
                raise ValueError(f"{where}: text before the first '{CODE_MARKER}' cell marker: {line!r}")
        else:
            kind, lines = cells[-1]
            lines.append(_markdown_line(line, where) if kind == "markdown" and line.strip() else line)
    return [(kind, "\n".join(_strip_blank(lines))) for kind, lines in cells if _strip_blank(lines)]


def build(twin: Path) -> nbformat.NotebookNode:
    """The notebook of a twin script: its cells, no outputs, ids ``cell-<n>``."""
    new = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    for index, (kind, source) in enumerate(parse(twin.read_text(), twin.name)):
        cell = new[kind](source)
        cell.id = f"cell-{index}"
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(twin: Path) -> str:
    """The ``.ipynb`` text of a twin, as written to disk."""
    return nbformat.writes(build(twin)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report notebooks that are out of date")
    args = ap.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        twin, notebook = EXAMPLES / f"{name}.py", EXAMPLES / f"{name}.ipynb"
        text = render(twin)
        if notebook.exists() and notebook.read_text() == text:
            continue
        stale.append(notebook.name)
        if not args.check:
            notebook.write_text(text)
    if args.check and stale:
        print(f"out of date (run python examples/build_notebooks.py): {', '.join(stale)}")
        return 1
    for name in ([] if args.check else stale):
        print(f"wrote examples/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
