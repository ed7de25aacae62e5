"""Summarize a Hydra multirun: runs ranked by a final metric, best first, with their overrides and a plot per swept
value.

    python scripts/sweep_summary.py multirun/2026-11-27_10-00-00 [--metric eval/loss] [--maximize | --minimize]
A metric is maximised when its name says so (accuracy, BLEU, exact match, ...) and minimised when it is a loss
(loss, perplexity, bits per byte/token, error); --maximize / --minimize decide for any other name, or override.
Writes summary.json and summary.png into the multirun directory.
"""

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def load_runs(sweep_dir: Path, metric: str) -> list[dict]:
    """One record per finished job: its overrides as a dict and its final metrics."""
    runs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        final = job_dir / "final_metrics.json"
        if not final.exists():
            continue
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) if "=" in o)
        metrics = json.loads(final.read_text())
        if metric not in metrics:
            raise SystemExit(f"error: {final} has no metric {metric!r} (valid: {', '.join(metrics)})")
        runs.append({"dir": job_dir.name, "overrides": overrides, "metrics": metrics, "value": metrics[metric]})
    return runs


MAXIMIZED = ("accuracy", "bleu", "exact_match", "f1", "score", "per_sec")
MINIMIZED = ("loss", "perplexity", "bits_per", "error", "mse")


def maximized(metric: str) -> bool:
    """Whether higher is better for `metric`, from its name; a one-line error when the name does not tell."""
    name = metric.rsplit("/", 1)[-1].lower()
    if any(word in name for word in MINIMIZED):
        return False
    if any(word in name for word in MAXIMIZED):
        return True
    raise ValueError(f"cannot tell whether {metric} is better higher or lower; pass --maximize or --minimize")


def rank(runs: list[dict], maximize: bool) -> list[dict]:
    """Runs best first by their "value"; a NaN (a diverged run) ranks last."""
    return sorted(runs, key=lambda r: (math.isnan(r["value"]), -r["value"] if maximize else r["value"]))


def as_number(value: str):
    try:
        return float(value)
    except ValueError:
        return value


def plot(runs: list[dict], swept: list[str], metric: str, out: Path) -> None:
    """The metric against each swept value; one panel per swept key, other keys as separate lines."""
    fig, axes = plt.subplots(1, len(swept), figsize=(5 * len(swept), 4), squeeze=False)
    for ax, key in zip(axes[0], swept):
        others = [k for k in swept if k != key]
        groups: dict[str, list] = {}
        for r in runs:
            label = ", ".join(f"{k}={r['overrides'][k]}" for k in others) or metric
            groups.setdefault(label, []).append((as_number(r["overrides"][key]), r["value"]))
        for label, points in groups.items():
            points.sort(key=lambda p: (isinstance(p[0], str), p[0]))
            xs, ys = zip(*points)
            ax.plot([str(x) if isinstance(x, str) else x for x in xs], ys, marker="o", label=label)
        if all(isinstance(as_number(r["overrides"][key]), float) and as_number(r["overrides"][key]) > 0
               for r in runs):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="eval/loss")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--maximize", "--max", dest="maximize", action="store_true", default=None,
                           help="higher is better, whatever the metric's name")
    direction.add_argument("--minimize", "--min", dest="maximize", action="store_false",
                           help="lower is better, whatever the metric's name")
    args = parser.parse_args()
    try:
        maximize = maximized(args.metric) if args.maximize is None else args.maximize
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    runs = load_runs(args.sweep_dir, args.metric)
    if not runs:
        raise SystemExit(f"error: no finished runs (with final_metrics.json) under {args.sweep_dir}")
    runs = rank(runs, maximize)
    keys = sorted({k for r in runs for k in r["overrides"]})
    swept = [k for k in keys if len({r["overrides"].get(k) for r in runs}) > 1]

    print(f"{len(runs)} runs in {args.sweep_dir}, ranked by {args.metric}, best first "
          f"({'highest' if maximize else 'lowest'})")
    header = ["rank", args.metric, *swept, "dir"]
    rows = [[str(i + 1), f"{r['value']:.5g}", *(r["overrides"].get(k, "") for k in swept), r["dir"]]
            for i, r in enumerate(runs)]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    (args.sweep_dir / "summary.json").write_text(json.dumps(
        {"metric": args.metric, "maximize": maximize, "swept": swept, "runs": runs}, indent=2) + "\n")
    if swept:
        plot(runs, swept, args.metric, args.sweep_dir / "summary.png")
    print(f"wrote {args.sweep_dir / 'summary.json'}" + (f" and {args.sweep_dir / 'summary.png'}" if swept else ""))


if __name__ == "__main__":
    main()
