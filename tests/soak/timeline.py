"""The soak's PNG timeline: faults as bands, counted orders per second, lag and DLQ size as lines."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.patches import Patch  # noqa: E402

from . import schedule as s  # noqa: E402
from .sampler import per_second  # noqa: E402

COLORS = {
    s.WORKER_KILL: "tab:red", s.WORKER_PAUSE: "tab:purple", s.HOST_KILL: "darkred",
    s.BROKER_KILL: "tab:orange", s.BROKER_RESTART: "gold", s.REDIS_KILL: "tab:brown",
    s.PRODUCER_CRASH: "tab:gray", s.PARTITIONS_ADD: "tab:cyan", s.REGISTRY_RESTART: "tab:olive",
    s.PARTITION: "tab:blue",
}
MIN_BAND_S = 1.0  # an instant fault (a SIGKILL) still shows as a thin band


def draw(report: dict, path: Path) -> None:
    """Write ``report``'s timeline to ``path``."""
    samples = [x for x in report["samples"] if "counted" in x]
    rates = per_second(report["samples"])
    fig, axes = plt.subplots(3, 1, figsize=(14, 8), sharex=True)
    counted_ax, lag_ax, dlq_ax = axes
    counted_ax.plot([r["t"] for r in rates], [r["counted_per_s"] for r in rates], color="tab:green", lw=1)
    counted_ax.set_ylabel("counted / s")
    lag_ax.plot([x["t"] for x in samples], [x["lag"] for x in samples], color="tab:blue", lw=1, label="lag (orders)")
    lag_ax.plot([x["t"] for x in samples], [x["retry_backlog"] for x in samples], color="tab:pink", lw=1,
                label="retry backlog")
    lag_ax.set_ylabel("messages")
    lag_ax.legend(loc="upper left", fontsize=8)
    dlq_ax.plot([x["t"] for x in samples], [x["dlq"] for x in samples], color="black", lw=1)
    dlq_ax.set_ylabel("DLQ size")
    dlq_ax.set_xlabel("seconds after the load started")
    kinds = sorted({f["kind"] for f in report["faults"]})
    for ax in axes:
        _bands(ax, report["faults"], kinds)
        for name, t in report.get("marks", {}).items():
            if t is not None:
                ax.axvline(t, color="black", ls="--", lw=0.8)
                if ax is counted_ax:
                    ax.annotate(name, (t, 1), xycoords=("data", "axes fraction"), fontsize=8, rotation=90,
                                va="top", ha="right")
    fig.legend(handles=[Patch(color=COLORS[k], alpha=0.35, label=k) for k in kinds], loc="lower center",
               fontsize=8, ncol=max(1, len(kinds)))
    v = report.get("verdict") or {}
    status = "PASSED" if v.get("passed") else "FAILED" if v else "no verdict"
    fig.suptitle(f"soak seed={report['seed']} {report['minutes']} min: {len(report['faults'])} faults, {status}")
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # room for the faults' legend at the bottom
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bands(ax, faults: list[dict], kinds: list[str]) -> None:
    """One band per fault from when it was applied to when it healed, in its kind's stripe
    of the plot's height, so that overlapping faults stay apart."""
    for f in faults:
        if f["applied_s"] is None or f["outcome"] == "skipped":
            continue
        row = kinds.index(f["kind"])
        start = f.get("active_s") or f["applied_s"]
        end = max(f["healed_s"] or start, start + MIN_BAND_S)
        ax.axvspan(start, end, ymin=row / len(kinds), ymax=(row + 1) / len(kinds),
                   color=COLORS.get(f["kind"], "tab:gray"), alpha=0.35, lw=0)
