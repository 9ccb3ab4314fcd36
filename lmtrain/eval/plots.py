"""PNG plots of long-context results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

LINESTYLES = ("-", "--", ":", "-.")


def plot_longctx(entries: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss vs position (log-x) and recurrent-state norm vs position, one colour per run.

    Each entry is `{"name": str, "longctx": evaluate_longctx(...) result}`. The dotted vertical
    line in the run's colour marks its training length; the thin dashed curve is the same tokens
    scored with the state restarted every T tokens, where computed.
    """
    fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, entry in enumerate(entries):
        res, color = entry["longctx"], colors[i % len(colors)]
        bins = [b for b in res["curve"] if b["loss"] is not None]
        x = [0.5 * (b["start"] + b["end"] - 1) + 1 for b in bins]  # 1-based bin centres
        ax_loss.plot(x, [b["loss"] for b in bins], color=color, marker=".", label=entry["name"])
        restart = [(xi, b["loss_restart"]) for xi, b in zip(x, bins) if b.get("loss_restart") is not None]
        if restart:
            ax_loss.plot(*zip(*restart), color=color, linestyle="--", linewidth=0.8, alpha=0.7,
                         label=f"{entry['name']}: state restarted every T")
        ax_loss.axvline(res["train_length"], color=color, linestyle=":", alpha=0.7)
        norms = res["state_norms"]
        for j, (layer, values) in enumerate(norms["layers"].items()):
            ax_norm.plot(norms["positions"], values["mean"], color=color, linestyle=LINESTYLES[j % len(LINESTYLES)],
                         label=f"{entry['name']}: {layer}")
        ax_norm.axvline(res["train_length"], color=color, linestyle=":", alpha=0.7)
    ax_loss.set(xscale="log", xlabel="position (tokens, log scale)", ylabel="mean loss (nats/token)",
                title="held-out loss vs position")
    ax_norm.set(xscale="log", yscale="log", xlabel="position (tokens, log scale)",
                ylabel="|h| (L2 norm, mean over sequences)", title="recurrent state norm vs position")
    ax_loss.legend(fontsize="small")
    if ax_norm.lines and any(line.get_label()[0] != "_" for line in ax_norm.lines):
        ax_norm.legend(fontsize="x-small")
    else:
        ax_norm.text(0.5, 0.5, "no recurrent layers", ha="center", va="center", transform=ax_norm.transAxes)
    for ax in (ax_loss, ax_norm):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
