"""PNG plots of a bench result: throughput vs concurrency, TTFT / TPOT percentiles."""

from __future__ import annotations

from pathlib import Path


class PlotError(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError("plots need matplotlib: pip install 'tierlm[bench]' (or pass --no-plots)") from e
    return plt


def _errorbars(summaries: list[dict], metric: str, scale: float = 1.0):
    med = [s[metric]["median"] * scale for s in summaries]
    lo = [m - s[metric]["min"] * scale for m, s in zip(med, summaries)]
    hi = [s[metric]["max"] * scale - m for m, s in zip(med, summaries)]
    return med, [lo, hi]


def draw(results: dict, out_dir: Path, title: str) -> list[Path]:
    """Write throughput.png and latency.png under out_dir; returns their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, w in results.items():
        conc = [lv["concurrency"] for lv in w["levels"]]
        med, err = _errorbars([lv["summary"] for lv in w["levels"]], "output_tok_per_s")
        ax.errorbar(conc, med, yerr=err, marker="o", capsize=3, label=f"{name} ({w['description']})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s (median, min-max)")
    ax.set_title(f"Throughput: {title}")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(out_dir / "throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    levels = [(f"{name} c={lv['concurrency']}", lv["summary"]) for name, w in results.items() for lv in w["levels"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(levels))
    for ax, (kind, metrics, scale) in zip(axes, (("TTFT", ("ttft_p50_s", "ttft_p90_s"), 1000),
                                                  ("TPOT", ("tpot_p50_s", "tpot_p90_s"), 1000))):
        width = 0.38
        for k, metric in enumerate(metrics):
            med, err = _errorbars([s for _, s in levels], metric, scale)
            ax.bar([i + (k - 0.5) * width for i in x], med, width, yerr=err, capsize=3,
                   label=metric.split("_")[1])
        ax.set_xticks(list(x), [label for label, _ in levels], rotation=30, ha="right")
        ax.set_ylabel(f"{kind} ms")
        ax.set_title(f"{kind} percentiles")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    paths.append(out_dir / "latency.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
