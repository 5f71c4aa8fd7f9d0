"""``report.md``: the run's funnel and figures, for a person to read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _summary_lines(name: str, summary: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", ""]
    for key, value in summary.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            header = list(value[0])
            lines += [f"**{key}**", ""] + _table(header, [[r.get(h) for h in header] for r in value]) + [""]
        elif isinstance(value, str) and value.endswith(".png"):
            lines += [f"![{key}]({value})", ""]
        else:
            lines += [f"- **{key}**: {json.dumps(value) if isinstance(value, (dict, list)) else value}"]
    return lines + [""]


def _ledger(c: dict[str, Any]) -> str:
    created, replaced = c.get("created", 0), c.get("replaced", 0)
    left = f"{c['input']} rows read" + (f" + {created} created" if created else "")
    right = f"{c['output']} rows out + {c['rejected']} rejected" + (f" + {replaced} replaced" if replaced else "")
    return f"**{left} = {right}** ({c['groups_output']} groups in the output)."


def render_report(manifest: dict[str, Any], out: Path) -> str:
    c = manifest["counts"]
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
        "## Rejected rows by reason",
        "",
        *_table(["reason", "rows"], [[r, n] for r, n in c["rejected_by_reason"].items()] or [["(none)", 0]]),
        "",
        "The rejected rows, with their file, row, reason and raw text, are in `rejected/`; "
        "rows a stage replaced with a row it created (the new row names it in `parent_row_id`) are in `replaced/`.",
        "",
    ]
    if manifest.get("summaries"):
        lines += ["## Stages", ""]
        for name, summary in manifest["summaries"].items():
            lines += _summary_lines(name, summary)
    if manifest.get("models"):
        lines += ["## Models", "", *_table(["stage", "name", "backend"],
                                             [[m["stage"], m["name"], m["backend"]] for m in manifest["models"]]), ""]
    return "\n".join(lines) + "\n"
