"""What the example notebooks share: aligned text tables, and figures shown
inline in a notebook or saved as ``<name>.png`` when a twin runs as a script
(importing this module selects matplotlib's non-interactive backend there)."""

import sys

import matplotlib

INTERACTIVE = "ipykernel" in sys.modules
if not INTERACTIVE:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def print_table(rows):
    """``rows`` (dicts with the same keys) as an aligned text table."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    columns = list(rows[0])
    width = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in columns}
    print("  ".join(f"{c:>{width[c]}}" for c in columns))
    for r in rows:
        print("  ".join(f"{cell(r[c]):>{width[c]}}" for c in columns))


def show(fig, name):
    """Display ``fig`` in a notebook; as a script, save it as ``<name>.png``."""
    if INTERACTIVE:
        plt.show()
    else:
        fig.savefig(f"{name}.png", dpi=120, bbox_inches="tight")
        print(f"saved {name}.png")
    plt.close(fig)
