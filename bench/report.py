"""From per-repetition results to the medians, ratios, targets and the printed table."""
from __future__ import annotations

from collections.abc import Callable

from .common import median

# figure -> (label, unit, target text, is the target met)
ROWS: dict[str, tuple[str, str, str | None, Callable[[float], bool] | None]] = {
    "ceiling_orders_per_s": ("ceiling: bare consumers, 3 procs x 1 partition, fastavro", "/s", None, None),
    "pipeline_orders_per_s": ("pipeline: supervised pool drains the backlog", "/s", ">= 50,000/s",
                              lambda v: v >= 50_000),
    "pipeline_to_ceiling": ("pipeline / ceiling", "x", ">= 0.5", lambda v: v >= 0.5),
    "failures_healthy_per_s": ("10% failures: healthy (1st-attempt) orders", "/s", None, None),
    "failures_handled_per_s": ("10% failures: backlog messages handled", "/s", None, None),
    "failures_to_failure_free": ("10% failures healthy / failure-free", "x", ">= 0.9", lambda v: v >= 0.9),
    "failures3_healthy_per_s": ("10% failures, 3 retry workers: healthy orders", "/s", None, None),
    "failures3_to_failure_free": ("10% failures, 3 retry workers / failure-free", "x", None, None),
    "latency_p50_ms": ("latency p50 at steady rate", "ms", None, None),
    "latency_p99_ms": ("latency p99 at steady rate", "ms", "<= 50 ms", lambda v: v <= 50),
    "latency_max_ms": ("latency max at steady rate", "ms", None, None),
    "lateness_p50_ms": ("retry lateness p50 (1,000/s, 30% failures, 200 ms base)", "ms", None, None),
    "lateness_p99_ms": ("retry lateness p99", "ms", "<= 50 ms", lambda v: v <= 50),
    "lateness_max_ms": ("retry lateness max", "ms", None, None),
    "producer_orders_per_s": ("producer: produce_orders (--rate 0)", "/s", None, None),
    "txn_producer_orders_per_s": ("producer: produce_orders --transactional (--rate 0)", "/s", None, None),
    "txn_producer_to_idempotent": ("produce_orders transactional / idempotent", "x", None, None),
    "loop_producer_per_s": ("producer: hand-written loop (make, encode, produce)", "/s", None, None),
    "producer_to_loop": ("produce_orders / hand-written loop", "x", ">= 0.8", lambda v: v >= 0.8),
    "bare_producer_per_s": ("producer: bare, pre-encoded, same config", "/s", None, None),
    "producer_to_bare": ("produce_orders / bare producer (librdkafka alone)", "x", None, None),
    "naive_orders_per_s": ("naive tutorial worker, 3 procs", "/s", None, None),
    "pipeline_to_naive": ("pipeline / naive", "x", None, None),
    "rss_peak_mb_max": ("worker RSS peak, highest worker", "MB", "<= 100 MB", lambda v: v <= 100),
    "rss_peak_mb_retry": ("retry worker RSS peak (10% failures)", "MB", "<= 80 MB", lambda v: v <= 80),
    "pools_1_orders_per_s": ("pools: 1 pool x 3 workers, 6 partitions", "/s", None, None),
    "pools_2_orders_per_s": ("pools: 2 pools x 3 workers, same machine", "/s", None, None),
    "pools_2_to_1": ("2 pools / 1 pool (one 2-core machine: no speed-up)", "x", None, None),
    "metrics_scrape_median_ms": ("metrics endpoint: scrape, 12 partitions, median", "ms", "< 50 ms",
                                 lambda v: v < 50),
    "metrics_scrape_max_ms": ("metrics endpoint: scrape, 12 partitions, slowest", "ms", "< 50 ms",
                              lambda v: v < 50),
}


class Figures:
    """Medians of repetitions (kept alongside) and ratios of medians."""

    def __init__(self):
        self.values: dict[str, float] = {}
        self.reps: dict[str, list[float]] = {}

    def median_of(self, name: str, values: list[float]) -> None:
        self.values[name] = median(values)
        self.reps[name] = values

    def ratio(self, name: str, top: str, bottom: str, paired: bool = False) -> None:
        """Ratio of medians or, for ``paired`` repetitions (run back to back or interleaved), the
        median of per-repetition ratios, which a slow spell on the machine skews less."""
        if top not in self.values or bottom not in self.values:
            return
        tops, bottoms = self.reps.get(top, []), self.reps.get(bottom, [])
        if paired and len(tops) > 1 and len(tops) == len(bottoms):
            self.median_of(name, [t / b for t, b in zip(tops, bottoms, strict=True)])
        else:
            self.values[name] = self.values[top] / self.values[bottom]


def build_report(raw: dict, meta: dict) -> dict:
    f = Figures()
    if "ceiling" in raw:
        f.median_of("ceiling_orders_per_s", [r["orders_per_s"] for r in raw["ceiling"]])
    if "pipeline" in raw:
        f.median_of("pipeline_orders_per_s", [r["orders_per_s"] for r in raw["pipeline"]])
    if "failures" in raw:
        f.median_of("failures_healthy_per_s", [r["orders_per_s"] for r in raw["failures"]])
        f.median_of("failures_handled_per_s", [r["handled_per_s"] for r in raw["failures"]])
    if "failures3" in raw:
        f.median_of("failures3_healthy_per_s", [r["orders_per_s"] for r in raw["failures3"]])
    for part in ("latency", "lateness"):
        if part in raw:
            for q in ("p50", "p99", "max"):
                f.median_of(f"{part}_{q}_ms", [r[f"{q}_ms"] for r in raw[part]])
    if "producer" in raw:
        f.median_of("producer_orders_per_s", [r["orders_per_s"] for r in raw["producer"]])
        f.median_of("bare_producer_per_s", [r["bare_per_s"] for r in raw["producer"]])
        if all("transactional_per_s" in r for r in raw["producer"]):
            f.median_of("txn_producer_orders_per_s", [r["transactional_per_s"] for r in raw["producer"]])
        if all("loop_per_s" in r for r in raw["producer"]):
            f.median_of("loop_producer_per_s", [r["loop_per_s"] for r in raw["producer"]])
    if "naive" in raw:
        f.median_of("naive_orders_per_s", raw["naive"])
    for hosts in (1, 2):
        if f"pools_{hosts}" in raw:
            f.median_of(f"pools_{hosts}_orders_per_s", [r["orders_per_s"] for r in raw[f"pools_{hosts}"]])
    if "metrics" in raw:
        f.median_of("metrics_scrape_median_ms", [r["median_ms"] for r in raw["metrics"]])
        f.median_of("metrics_scrape_max_ms", [r["max_ms"] for r in raw["metrics"]])
    f.ratio("pools_2_to_1", "pools_2_orders_per_s", "pools_1_orders_per_s", paired=True)
    f.ratio("pipeline_to_ceiling", "pipeline_orders_per_s", "ceiling_orders_per_s")
    f.ratio("failures_to_failure_free", "failures_healthy_per_s", "pipeline_orders_per_s", paired=True)
    f.ratio("failures3_to_failure_free", "failures3_healthy_per_s", "pipeline_orders_per_s", paired=True)
    f.ratio("producer_to_loop", "producer_orders_per_s", "loop_producer_per_s", paired=True)
    f.ratio("txn_producer_to_idempotent", "txn_producer_orders_per_s", "producer_orders_per_s", paired=True)
    f.ratio("producer_to_bare", "producer_orders_per_s", "bare_producer_per_s", paired=True)
    f.ratio("pipeline_to_naive", "pipeline_orders_per_s", "naive_orders_per_s")
    rss = rss_peaks(raw)
    if rss:
        f.values["rss_peak_mb_max"] = max(rss.values())
        retry = [mb for name, mb in rss.items() if "retry" in name]
        if retry:
            f.values["rss_peak_mb_retry"] = max(retry)
    figures = {k: f.values[k] for k in ROWS if k in f.values}
    targets = {k: {"target": ROWS[k][2], "met": met(v)} for k, v in figures.items() if (met := ROWS[k][3])}
    return {"meta": meta, "figures": figures, "repetitions": f.reps, "targets": targets,
            "rss_peak_mb": rss, "raw": raw}


def rss_peaks(raw: dict) -> dict[str, float]:
    """Each pool worker's highest RSS over every drain (failure-free and with failures).

    The drains with three retry workers are left out: their retry workers share the
    retried orders, so they would hide the peak of the single retry worker."""
    peaks: dict[str, float] = {}
    for run in raw.get("pipeline", []) + raw.get("failures", []):
        for name, mb in run["rss_peak_mb"].items():
            peaks[name] = max(peaks.get(name, 0.0), mb)
    return peaks


def _fmt(value: float, unit: str) -> str:
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}"
    return f"{value:,.0f} {unit}" if unit == "ms" else f"{value:.1f} {unit}"


def render_table(report: dict) -> str:
    meta = report["meta"]
    rows = []
    for name, value in report["figures"].items():
        label, unit, target, _ = ROWS[name]
        reps = report["repetitions"].get(name, [])
        met = report["targets"].get(name, {}).get("met")
        rows.append((label, _fmt(value, unit), ", ".join(_fmt(v, unit) for v in reps) if len(reps) > 1 else "",
                     target or "", "" if met is None else ("yes" if met else "NO")))
    width = max([len("repetitions")] + [len(r[2]) for r in rows])
    lines = [f"orders benchmark: {meta['orders']:,} orders backlog, median of {meta['reps']} rep(s) "
             f"({meta.get('ceiling_reps', meta['reps'])} for the ceiling), {meta['cpus']} CPUs, "
             f"load {meta['load_before'][0]:.1f} -> {meta['load_after'][0]:.1f}, {meta['duration_s']:.0f} s, "
             f"revision {meta['revision']}",
             f"{'figure':<58} {'median':>12}  {'repetitions':<{width}}  {'target':<12} met"]
    for label, value, reps, target, met in rows:
        lines.append(f"{label:<58} {value:>12}  {reps:<{width}}  {target:<12} {met}")
    for name, mb in report["rss_peak_mb"].items():
        lines.append(f"  RSS peak {name:<48} {mb:>9.1f} MB")
    return "\n".join(lines)
