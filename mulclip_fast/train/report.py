"""What a run reports: its jsonl logs, the loss and retrieval plots, and the summary table."""

from __future__ import annotations

import json
import os
import sys

from ..eval import format_table
from ..losses import TERMS, current_term_names
from ..model import CheckpointError
from .checkpoint import atomic_write_text
from .config import TrainConfig


def read_jsonl(path: str) -> list[dict]:
    """The records of a jsonl log (none when it has not been written yet).

    A last line a crash cut off (no newline and not JSON) is left out: the record it began is lost with
    the step that wrote it, which a resumed run redoes. Any other line that is not JSON is damage the run
    did not cause, reported as ``CheckpointError`` with the file and line.
    """
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as handle:
        lines = handle.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the final line, with no newline after it: torn
                print(f"warning: {path}:{number} was cut off ({exc}); left out", file=sys.stderr)
                continue
            raise CheckpointError(f"{path}:{number} is not a JSON record ({exc}); the run's log is damaged") from None
    return records


def truncate_jsonl(path: str, keep) -> None:
    """Keep the records of a log for which ``keep(record)`` holds: a resumed run drops what it redoes.

    The kept records of a run logged before the loss terms were renamed (``losses.RENAMED_TERMS``) take the
    current names, so the resumed log, its plots and its summary name each term one way.
    """
    if not os.path.exists(path):
        return
    kept = [current_term_names(record, warn=False) for record in read_jsonl(path) if keep(record)]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def write_plots(out: str) -> None:
    """``loss.png`` (every loss term over the steps) and ``retrieval.png`` (validation recall and binding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_jsonl(os.path.join(out, "metrics.jsonl"))
    if metrics:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [m["step"] for m in metrics]
        for name in ("loss", *TERMS):
            if name in metrics[-1]:
                values = [m.get(name, float("nan")) for m in metrics]
                ax.plot(steps, values, label=name, linewidth=1.0 if name != "loss" else 1.8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (unweighted terms)")
        ax.set_title("training losses")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss.png"), dpi=100)
        plt.close(fig)
    vals = read_jsonl(os.path.join(out, "val.jsonl"))
    if vals:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("t2i_r1", "t2i_r5", "i2t_r1", "i2t_r5", "binding_acc"):
            points = [(v["step"], v[key]) for v in vals if v.get(key) is not None and v.get("split") != "test"]
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)[0] if points else None
            final = [v for v in vals if v.get("split") == "test" and v.get(key) is not None]
            if final:
                # Labelled here when no validation line carries the key (a run without validation).
                color, label = (line.get_color(), None) if line else (None, key)
                ax.scatter([final[-1]["step"]], [final[-1][key]], marker="*", s=120, color=color, label=label)
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.set_title("retrieval (lines: validation, stars: final test)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "retrieval.png"), dpi=100)
        plt.close(fig)


def summary_table(config: TrainConfig, summary: dict, terms: tuple[str, ...]) -> str:
    metrics = read_jsonl(os.path.join(config.out, "metrics.jsonl"))
    tail = metrics[-10:]
    rows = [
        ("objective", f"{config.loss} ({', '.join(terms)})"),
        ("steps", f"{summary['steps']} / {summary['total_steps']}"),
        ("training time", f"{summary['train_seconds']:.1f} s (steps, validations and saves)"),
    ]
    if tail:
        logged = f"last {len(tail)} logged steps" if len(tail) > 1 else "last logged step"  # --log-every apart
        rows.append(("samples / s", f"{sum(m['samples_per_s'] for m in tail) / len(tail):.1f} (mean of the {logged})"))
        # Means, not the last step's values: one step's loss is noisy. Said so in the row, since a term that
        # starts late (WPR, SAP from scratch) is averaged over fewer steps than the total it is part of.
        for name in ("loss", *TERMS):
            values = [m[name] for m in tail if name in m]
            if values:
                steps = f"last {len(values)} logged steps" if len(values) > 1 else "last logged step"
                rows.append((f"mean {name}", f"{sum(values) / len(values):.4f} ({steps})"))
        rows.append(("peak memory", f"{tail[-1]['memory_mb']:.0f} MiB (rank 0's process)"))
    if summary.get("skipped_images"):
        rows.append(("skipped images", f"{summary['skipped_images']} (see skipped.json)"))
    if summary.get("bad_records"):
        rows.append(("bad records", f"{summary['bad_records']} (see bad_records.json)"))
    width = max(len(r[0]) for r in rows)
    lines = ["", "summary", "-" * 40] + [f"{k:<{width}}  {v}" for k, v in rows]
    if "eval" in summary:
        lines += ["-" * 40, format_table(summary["eval"])]
    lines.append(f"run directory: {config.out}")
    return "\n".join(lines)
