"""``report.md``: the run's funnel and figures, for a person to read.

The figures are PNGs in ``OUT/report/`` (:mod:`thresher.schemas.report_plots`), linked relatively,
so the report and its folder can be moved together. ``thresher report OUT`` renders both again
from ``OUT/manifest.json`` and the output's Parquet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from thresher.schemas.report_plots import Figure, Plots, make_plots


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _images(figures: list[Figure], notes: Sequence[str] = ()) -> list[str]:
    lines = [line for f in figures for line in (f"![{f.title}]({f.path})", "")]
    return lines + ([f"- {n}" for n in notes] + [""] if notes else [])


def _summary_lines(name: str, summary: dict[str, Any], figures: list[Figure], notes: list[str]) -> list[str]:
    lines = [f"### {name}", ""]
    for key, value in summary.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            header = list(value[0])
            lines += [f"**{key}**", ""] + _table(header, [[r.get(h) for h in header] for r in value]) + [""]
        elif isinstance(value, str) and value.endswith(".png"):
            lines += [f"![{key}]({value})", ""]
        else:
            lines += [f"- **{key}**: {json.dumps(value) if isinstance(value, (dict, list)) else value}"]
    return lines + [""] + _images(figures, notes)


def _ledger(c: dict[str, Any]) -> str:
    created, replaced = c.get("created", 0), c.get("replaced", 0)
    left = f"{c['input']} rows read" + (f" + {created} created" if created else "")
    right = f"{c['output']} rows out + {c['rejected']} rejected" + (f" + {replaced} replaced" if replaced else "")
    return f"**{left} = {right}** ({c['groups_output']} groups in the output)."


def render_report(manifest: dict[str, Any], out: Path, figures: bool = True) -> str:
    """The markdown of ``report.md``; writes its figures to ``out/report/`` (replacing an earlier
    run's), unless ``figures`` is False (then the tables only, and no ``report/``)."""
    c = manifest["counts"]
    if figures:
        plots = make_plots(manifest, Path(out))
    else:
        plots = Plots()
        shutil.rmtree(Path(out) / "report", ignore_errors=True)  # no figures of an earlier run stay linked to none
    lines = [
        f"# thresher report: {manifest['name']}",
        "",
        f"Finished {manifest['finished_at']} in {manifest['timings']['total_seconds']} s.",
        "",
        _ledger(c),
        "",
        "## Inputs",
        "",
        *_table(["source", "format", "rows read", "rejected at ingest"],
                [[i["source"], i["format"], i["records"] + i["rejected"], i["rejected"]] for i in manifest["inputs"]]),
        "",
        "## Funnel",
        "",
        *_table(["stage", "rows in", "created", "rejected", "replaced", "rows out", "tasks computed",
                 "tasks reused", "seconds"],
                [[s["stage"], s["in"], s.get("created", 0), s["rejected"], s.get("replaced", 0), s["out"],
                  s["computed"], s["cached"], s["seconds"]] for s in manifest["stages"]]),
        "",
        *_images(plots.of("funnel"), plots.notes_of("funnel")),
        "## Rejected rows by reason",
        "",
        *_table(["reason", "rows"], [[r, n] for r, n in c["rejected_by_reason"].items()] or [["(none)", 0]]),
        "",
        "The rejected rows, with their file, row, reason and raw text, are in `rejected/`; "
        "rows a stage replaced with a row it created (the new row names it in `parent_row_id`) are in `replaced/`.",
        "",
    ]
    if plots.of("attributes") or plots.notes_of("attributes"):
        lines += ["## Attributes by source", "",
                  "The numeric attributes of the output's rows, one series per source, each as a share of its "
                  "source's rows (n: the source's rows with a value).", "",
                  *_images(plots.of("attributes"), plots.notes_of("attributes"))]
    summaries = manifest.get("summaries") or {}
    if summaries:
        lines += ["## Stages", ""]
        for name, summary in summaries.items():
            lines += _summary_lines(name, summary, plots.of(name), plots.notes_of(name))
    placed = {"funnel", "attributes", *summaries}
    others = [f for f in plots.figures if f.section not in placed]
    other_notes = [text for section, text in plots.notes if section not in placed]
    if others or other_notes:
        lines += ["## Other figures", "", *_images(others, other_notes)]
    if manifest.get("models"):
        lines += ["## Models", "", *_table(["stage", "name", "backend"],
                                             [[m["stage"], m["name"], m["backend"]] for m in manifest["models"]]), ""]
    return "\n".join(lines) + "\n"
