"""The study's results: ``results.json``, the markdown table ``results.md`` and the plot ``results.png``.

Every number is a mean ± sample standard deviation over the seeds; each seed fixes the fine-tuning data,
the calibration modules' initialisation and the test set, the same for every row, so rows of one seed are
paired. The question of the study — does full MulCLIP beat global-only fine-tuning by more than the spread
across seeds? — is answered per metric by the rule in ``compare``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable

from ..train.checkpoint import atomic_write_text
from .plan import ROWS, Row, StudySettings

ABLATION_KEYS = frozenset(row.key for row in ROWS)


def _mean_of(*keys: str) -> Callable[[dict], float | None]:
    def metric(result: dict) -> float | None:
        values = [result.get(k) for k in keys]
        return None if any(v is None for v in values) else sum(values) / len(values)

    return metric


# (key, column title, how it is read from an eval.json). Long R@1 is the paper's metric: the mean of the
# text-to-image and image-to-text R@1.
METRICS: tuple[tuple[str, str, Callable[[dict], float | None]], ...] = (
    ("long_r1", "long R@1 (mean)", _mean_of("t2i_r1", "i2t_r1")),
    ("t2i_r1", "long T2I R@1", _mean_of("t2i_r1")),
    ("i2t_r1", "long I2T R@1", _mean_of("i2t_r1")),
    ("long_r5", "long R@5 (mean)", _mean_of("t2i_r5", "i2t_r5")),
    ("short_r1", "short R@1 (mean)", _mean_of("short_t2i_r1", "short_i2t_r1")),
    ("hardneg_mean", "hard negatives (mean of 6 kinds)", _mean_of("hardneg_mean")),
    *(
        (f"hardneg_{kind}", f"hard neg.: {kind}", _mean_of(f"hardneg_{kind}"))
        for kind in ("colour", "shape", "size", "position", "relation", "binding")
    ),
    ("grounding_r5", "grounding R@5", _mean_of("grounding_r5")),
    ("compositional_r1", "compositional R@1 (mean)", _mean_of("compositional_t2i_r1", "compositional_i2t_r1")),
    ("compositional_hardneg_mean", "compositional hard neg.", _mean_of("compositional_hardneg_mean")),
    ("zeroshot_synthetic_acc", "zero-shot shapes", _mean_of("zeroshot_synthetic_acc")),
)
# The metrics the study's question names: long-caption retrieval and fine-grained discrimination (the hard
# negatives that change one detail; binding is one of their kinds).
QUESTION_METRICS = ("long_r1", "hardneg_mean", "hardneg_binding")
# The markdown's tables: retrieval and transfer; discrimination of one changed detail.
TABLES = (
    (
        "Retrieval",
        (
            "long_r1",
            "t2i_r1",
            "i2t_r1",
            "long_r5",
            "short_r1",
            "compositional_r1",
            "grounding_r5",
            "zeroshot_synthetic_acc",
        ),
    ),
    (
        "Fine-grained discrimination (true long caption vs. one detail changed; chance 0.5)",
        (
            "hardneg_mean",
            *(f"hardneg_{k}" for k in ("colour", "shape", "size", "position", "relation", "binding")),
            "compositional_hardneg_mean",
        ),
    ),
)


def metric_values(result: dict) -> dict[str, float]:
    """The study's metrics of one evaluation (those it reports)."""
    values = {key: read(result) for key, _, read in METRICS}
    return {key: v for key, v in values.items() if v is not None}


def _sample_std(values: list[float]) -> float | None:
    """The sample standard deviation (n - 1); ``None`` for fewer than two values, whose spread is unknown
    (not 0)."""
    return statistics.stdev(values) if len(values) > 1 else None


def summarise(per_seed: dict[str, dict]) -> dict:
    """Mean and sample standard deviation (``None`` for one seed) of every metric over the seeds."""
    values = [metric_values(result) for result in per_seed.values()]
    keys = [k for k, _, _ in METRICS if all(k in v for v in values)]
    mean = {k: statistics.fmean(v[k] for v in values) for k in keys}
    std = {k: _sample_std([v[k] for v in values]) for k in keys}
    return {"mean": mean, "std": std}


def compare(a: dict, b: dict, a_seeds: dict[str, dict], b_seeds: dict[str, dict]) -> dict:
    """Row ``a`` against row ``b`` per metric: the difference of the means, the paired differences (same
    seed, matched by the seed's name: ``paired``, in ``a_seeds``' order) and their mean ± std, and
    ``beats``: a's mean is above b's by more than the larger of the two rows' standard deviations across
    seeds — a gap that the seeds' own spread does not cover. A row of one seed has no spread: ``spread``
    and ``beats`` are then ``None`` (undecided), as are the statistics of fewer than two paired seeds."""
    out = {}
    for key in a["mean"]:
        if key not in b["mean"]:
            continue
        by_seed = {s: metric_values(a_seeds[s])[key] - metric_values(b_seeds[s])[key] for s in a_seeds if s in b_seeds}
        paired = list(by_seed.values())
        stds = (a["std"][key], b["std"][key])
        spread = None if None in stds else max(stds)
        diff = a["mean"][key] - b["mean"][key]
        out[key] = {
            "difference": diff,
            "paired": by_seed,
            "paired_mean": statistics.fmean(paired) if paired else None,
            "paired_std": _sample_std(paired),
            "spread": spread,
            "beats": None if spread is None else diff > spread,
        }
    return out


def verdict(comparison: dict) -> str:
    """The rule's answer for one metric of ``compare``, in words."""
    if comparison["beats"] is None:
        return "cannot tell whether MulCLIP beats global-only (one seed: no spread across seeds)"
    return f"MulCLIP {'beats' if comparison['beats'] else 'does not beat'} global-only"


def _cell(summary: dict, key: str) -> str:
    if key not in summary["mean"]:
        return "—"
    std = summary["std"][key]
    return f"{summary['mean'][key]:.3f} " + ("(one seed)" if std is None else f"± {std:.3f}")


def markdown(results: dict) -> str:
    settings = results["settings"]
    titles = {k: t for k, t, _ in METRICS}
    seeds = ", ".join(str(s) for s in settings["seeds"])
    lines = [
        "# MulCLIP ablation: fine-tuning a short-caption-pretrained CLIP on long captions",
        "",
        f"`python -m mulclip_fast.study` — tiny preset, synthetic data. Pretraining: {settings['pretrain_steps']} "
        f"steps of {settings['batch_size']} on summaries (lr {settings['pretrain_lr']:g}). Fine-tuning: "
        f"{settings['finetune_steps']} steps of {settings['batch_size']} per row (lr {settings['finetune_lr']:g}), "
        f"seeds {seeds}; {settings['eval_pairs']} test pairs per seed. Mean ± standard deviation over the seeds. "
        f"This invocation took {results['invocation_seconds'] / 60:.1f} min (rows finished by earlier "
        "invocations of the same directory are read, not rerun).",
    ]
    for heading, table_keys in TABLES:
        keys = [k for k in table_keys if any(k in r["mean"] for r in results["rows"].values())]
        lines += [
            "",
            f"## {heading}",
            "",
            "| objective | " + " | ".join(titles[k] for k in keys) + " |",
            "|---|" + "---|" * len(keys),
            "| pretrained, not fine-tuned | " + " | ".join(_cell(results["pretrained"], k) for k in keys) + " |",
        ]
        for row in results["rows"].values():
            lines.append(f"| {row['label']} | " + " | ".join(_cell(row, k) for k in keys) + " |")
    comparison = results.get("mulclip_vs_global")
    if comparison:
        lines += [
            "",
            "## MulCLIP against global-only fine-tuning",
            "",
            "Beats: mean above by more than the larger std.",
            "",
        ]
        for key in QUESTION_METRICS:
            if key in comparison:
                c = comparison[key]
                paired = ", ".join(f"seed {seed} {d:+.3f}" for seed, d in c.get("paired", {}).items()) or "none"
                if c["paired_mean"] is not None:
                    std = "" if c["paired_std"] is None else f" ± {c['paired_std']:.3f}"
                    paired += f"; mean {c['paired_mean']:+.3f}{std}"
                spread = "none" if c["spread"] is None else f"{c['spread']:.3f}"
                lines.append(
                    f"- {titles[key]}: {c['difference']:+.3f} (paired per seed {paired}; spread {spread}) — "
                    f"{verdict(c)}."
                )
    gradients = results.get("gradients")
    if gradients:
        labels = {key: row["label"] for key, row in results["rows"].items()}
        batches = next(iter(next(iter(gradients.values())).values()))["batches"]
        lines += [
            "",
            "## Gradient alignment at the fine-tuning start",
            "",
            f"Shared parameters (towers and projections); per seed, the mean over {batches} training batches.",
            "",
            "| objective | seed | "
            + " | ".join(f"cos(global, {t}) | ‖{t}‖/‖global‖" for t in ("wpr", "sap", "finelip"))
            + " |",
            "|---|---|" + "---|---|" * 3,
        ]
        for key, per_seed in gradients.items():
            for seed, g in per_seed.items():
                cells = " | ".join(
                    f"{g[t]['cosine']:+.3f} | {g[t]['norm_ratio']:.2f}" for t in ("wpr", "sap", "finelip")
                )
                lines.append(f"| {labels.get(key, key)} | {seed} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    """Grouped bars of the question's metrics and short R@1, one group per objective, error bars = std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in (*QUESTION_METRICS, "short_r1") if any(k in r["mean"] for r in results["rows"].values())]
    titles = {k: t for k, t, _ in METRICS}
    # The ablation's rows answer the question; the variants are in the tables (all rows if only variants ran).
    ablation = [r for key, r in results["rows"].items() if key in ABLATION_KEYS] or list(results["rows"].values())
    groups = [("pretrained", results["pretrained"])] + [(r["label"], r) for r in ablation]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4.5))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        xs = [g + (i - (len(keys) - 1) / 2) * width for g in range(len(groups))]
        means = [summary["mean"].get(key, math.nan) for _, summary in groups]
        stds = [summary["std"].get(key) or 0.0 for _, summary in groups]  # one seed: no error bar
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=titles[key])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], rotation=25, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("fine-tuning a short-caption-pretrained tiny CLIP (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(
    out: str,
    settings: StudySettings,
    rows: tuple[Row, ...],
    evals: dict[str, dict[str, dict]],
    baseline: dict[str, dict],
    gradients: dict,
    seconds: float,
) -> dict:
    """Assemble, write and return ``results.json``; also ``results.md`` and ``results.png``. ``seconds``: the
    wall time of this invocation, which may have run only some of the rows (a resumed study)."""
    results = {
        "settings": settings.to_dict(),
        "invocation_seconds": seconds,
        "pretrained": {**summarise(baseline), "seeds": baseline},
        "rows": {
            row.key: {
                "label": row.label,
                "settings": row.settings,
                **summarise(evals[row.key]),
                "seeds": evals[row.key],
            }
            for row in rows
        },
        "gradients": gradients,
    }
    if "mulclip" in evals and "global" in evals:
        r = results["rows"]
        results["mulclip_vs_global"] = compare(r["mulclip"], r["global"], evals["mulclip"], evals["global"])
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(results, indent=2))
    atomic_write_text(os.path.join(out, "results.md"), markdown(results))
    plot(results, os.path.join(out, "results.png"))
    return results
