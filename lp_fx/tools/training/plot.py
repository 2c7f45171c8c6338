"""A fine-tuning run's record as a picture: training loss per step and held-out perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lp_fx.files import atomic_write


def plot_record(record: dict[str, Any], path: str | Path) -> None:
    """Training loss per step and held-out perplexity, one PNG, written whole or not at all."""
    import matplotlib  # lazy: matplotlib's import takes seconds; only a plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib's import takes seconds; only a plot needs it

    fig, loss_axis = plt.subplots(figsize=(7, 4))
    steps = [point["step"] for point in record["loss"]]
    loss_axis.plot(steps, [point["loss"] for point in record["loss"]], color="tab:blue", lw=1)
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel(f"training loss ({record['args']['loss']})", color="tab:blue")
    if record["heldout"]:
        ppl_axis = loss_axis.twinx()
        ppl_axis.plot([p["step"] for p in record["heldout"]], [p["ppl"] for p in record["heldout"]],
                      "o-", color="tab:red")
        ppl_axis.set_ylabel("held-out perplexity (WikiText-2 test)", color="tab:red")
    loss_axis.set_title(f"fine-tuning {record['args'].get('pairing', '')}: {record['wall_s']:.0f} s")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
