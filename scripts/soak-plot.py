"""Draws a soak's curve: server RSS, open fds and latency per interval, from `chat-bench soak`'s
table.

    soak-plot.py target/soak/soak.csv target/soak/soak.png

Reads `soak.json` beside the CSV, when it is there, for the title and the warm-up (shaded).
Needs matplotlib (pinned in scripts/soak-requirements.txt; scripts/soak installs it).
"""

import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BACKENDS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def main(csv_path, png_path):
    with open(csv_path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows:
        sys.exit(f"{csv_path}: no rows")
    plan = {}
    json_path = os.path.join(os.path.dirname(csv_path), "soak.json")
    if os.path.exists(json_path):
        with open(json_path) as f:
            plan = json.load(f).get("plan", {})

    def col(name):
        return [r[name] for r in rows]

    minutes = col("minute")
    fig, (rss, fds, lat) = plt.subplots(3, 1, sharex=True, figsize=(9, 8.5))
    title = "chat-service soak"
    if plan:
        title += (
            f" on {BACKENDS.get(plan['backend'], plan['backend'])}: {plan['send_rate']:.0f} sends/s over {plan['users']} users, "
            f"{plan['history_rate']:.0f} history reads/s, {plan['subscribers']} feeds coming and going, "
            f"{plan['upload_rate']:g} uploads/s"
        )
    fig.suptitle(title, fontsize=10)

    rss.plot(minutes, col("rss_mib"), marker="o", markersize=3, color="tab:blue")
    rss.set_ylabel("server RSS (MiB)")
    fds.plot(minutes, col("fds"), marker="o", markersize=3, color="tab:green")
    fds.set_ylabel("open fds")
    # Rows with no sends (the first, taken before the load starts) have no latency.
    for name, label, color in (("send", "send", "tab:red"), ("page", "history page", "tab:purple")):
        pts = [(m, r) for m, r in zip(minutes, rows) if r[f"{name}_p99_ms"] > 0]
        lat.plot([m for m, _ in pts], [r[f"{name}_p99_ms"] for _, r in pts],
                 marker="o", markersize=3, color=color, label=f"{label} p99")
        lat.plot([m for m, _ in pts], [r[f"{name}_p50_ms"] for _, r in pts],
                 linestyle="--", color=color, alpha=0.6, label=f"{label} p50")
    # Log scale: p50 (about a millisecond) and p99 (tens to hundreds) both readable.
    lat.set_yscale("log")
    lat.set_ylabel("latency in the interval (ms, log)")
    errors = sum(col("errors"))
    lat.set_xlabel(f"minutes (errors in the run: {errors:.0f})",
                   color="tab:red" if errors else "black")
    # Room above the curves (a factor of 5 on the log scale) for the legend.
    top = max([r["send_p99_ms"] for r in rows] + [r["page_p99_ms"] for r in rows] + [1.0])
    lat.set_ylim(top=top * 5)
    lat.legend(fontsize=8, ncol=4, loc="upper left")

    warmup = plan.get("warmup_seconds", 0) / 60
    for ax in (rss, fds):
        ax.set_ylim(bottom=0)  # flat must look flat: no zoomed-in axis
    for ax in (rss, fds, lat):
        ax.grid(True, alpha=0.3, which="both" if ax is lat else "major")
        if warmup > 0:
            ax.axvspan(0, warmup, color="grey", alpha=0.12, label=None)
    if warmup > 0:
        rss.text(warmup / 2, 0.05, "warm-up", transform=rss.get_xaxis_transform(),
                 ha="center", fontsize=8, color="grey")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: soak-plot.py SOAK.CSV OUT.PNG")
    main(sys.argv[1], sys.argv[2])
