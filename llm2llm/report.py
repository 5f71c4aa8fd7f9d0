"""The LLM2LLM loop's ``report.md``: accuracy per iteration (a table and a figure), augmentations, rejections.

The figure is ``OUT/report/llm2llm_accuracy.png`` (matplotlib's Agg backend, as the curate
report's), left out with ``figures: false`` or ``THRESHER_REPORT_FIGURES=0``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from thresher.schemas.report_plots import FOLDER, _new_figure

FIGURE = "llm2llm_accuracy.png"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def accuracy_figure(manifest: dict[str, Any], path: Path) -> None:
    """Accuracy on the seeds and on the held-out set per iteration (lines), augmentations (bars)."""
    rows = manifest["iterations"]
    xs = [m["iteration"] for m in rows]
    fig = _new_figure(6.0, 3.4, left=0.8, right=0.8)
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    ax2.bar(xs, [m["augmentations"] for m in rows], width=0.4, color="#cccccc", label="augmentations accepted")
    ax2.set_ylabel("augmentations")
    for key, label, color in (("seed_accuracy", "seeds", "#4c72b0"), ("held_out_accuracy", "held-out", "#dd8452")):
        values = [m[key] for m in rows]
        if any(v is not None for v in values):
            ax.plot(xs, [100 * v if v is not None else float("nan") for v in values], marker="o", color=color,
                    label=f"accuracy: {label}")
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlabel("iteration")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(xs)
    ax.set_title("LLM2LLM: student accuracy per iteration")
    lines, labels = ax.get_legend_handles_labels()
    bars, bar_labels = ax2.get_legend_handles_labels()
    ax.legend(lines + bars, labels + bar_labels, loc="upper left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def write_report(manifest: dict[str, Any], out: Path) -> Path:
    """Write ``out/report.md`` (and its figure) from the loop's manifest."""
    config, counts = manifest["config"], manifest["counts"]
    lines = [f"# LLM2LLM: {manifest['name']}", "",
             f"Student `{config['student']['name']}`, teacher `{config['teacher']['model']['name']}`, "
             f"{len(manifest['iterations'])} iteration(s), grader `{config['grader']}`, "
             f"evaluation {config['evaluation']['mode']}; {manifest['seconds']} s.", ""]
    figures = config.get("figures", True) and os.environ.get("THRESHER_REPORT_FIGURES", "1") != "0"
    if figures:
        accuracy_figure(manifest, out / FOLDER / FIGURE)
        lines += [f"![accuracy per iteration]({FOLDER}/{FIGURE})", ""]
    lines += ["| iteration | trained on | seeds accuracy | held-out accuracy | seeds wrong | teacher requests "
              "(retries) | accepted | rejected |", "|---|---|---|---|---|---|---|---|"]
    for m in manifest["iterations"]:
        lines.append(f"| {m['iteration']} | {m['train_rows']} | {_percent(m['seed_accuracy'])} | "
                     f"{_percent(m['held_out_accuracy'])} | {m['seeds_wrong']} | {m['requests']} ({m['retries']}) | "
                     f"{m['augmentations']} | {m['rejected']} |")
    seeds = counts["seeds"]
    lines += ["", f"- **seeds**: {seeds['used']} used of {seeds['read']} rows read ({seeds['rejected']} rejected "
                  f"on read, {seeds['not_sampled']} not sampled)"]
    if counts.get("held_out"):
        held = counts["held_out"]
        lines.append(f"- **held-out**: {held['used']} used of {held['read']} rows read "
                     f"({held['rejected']} rejected on read)")
    lines += [f"- **final training set** (`data/`): {counts['output']} rows = {seeds['used']} seeds + "
              f"{counts['augmentations']} augmentations",
              f"- **rejected** (`rejected/`): {counts['rejected']}", ""]
    if counts["rejected_by_reason"]:
        lines += ["| reason | rows |", "|---|---|"]
        lines += [f"| {reason} | {n} |" for reason, n in counts["rejected_by_reason"].items()]
        lines.append("")
    ran = sum(1 for s in manifest["steps"] if s["status"] == "ran")
    lines += [f"Steps: {ran} ran, {len(manifest['steps']) - ran} reused or skipped (see `manifest.json`).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
