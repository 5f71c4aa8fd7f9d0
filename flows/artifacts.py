"""The run's summary as Prefect artifacts, so a deployment's run page shows its funnel.

Two artifacts per run: ``thresher-funnel`` (a table: one row per stage, rows in / created /
rejected / replaced / out) and ``thresher-report`` (the markdown of ``report.md`` with the
counts ledger). Outside a Prefect run (no flow-run context) nothing is published.

The report's figures are PNG files in ``OUT/report/``, linked relatively from ``report.md``; a
Prefect server cannot show them, so the artifact names each figure and the file that holds it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from thresher.schemas.secrets import redact

FUNNEL_KEY = "thresher-funnel"
REPORT_KEY = "thresher-report"


def funnel_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage, as the funnel table of ``report.md`` shows it."""
    return [{"stage": s["stage"], "rows in": s["in"], "created": s.get("created", 0), "rejected": s["rejected"],
             "replaced": s.get("replaced", 0), "rows out": s["out"], "seconds": s["seconds"]}
            for s in manifest["stages"]]


_FIGURE = re.compile(r"!\[([^\]]*)\]\((report/[^)\s]+\.png)\)")


def artifact_markdown(report_markdown: str, out: str | None) -> str:
    """``report.md`` for Prefect's UI: each figure link (relative to OUT) becomes its title and file."""
    def figure(match: re.Match) -> str:
        where = Path(out) / match.group(2) if out else match.group(2)
        return f"*Figure: {match.group(1)} (`{where}`)*"

    return _FIGURE.sub(figure, report_markdown)


def publish_artifacts(manifest: dict[str, Any], report_markdown: str) -> list[str]:
    """Create the funnel table and the report markdown as artifacts of the current flow run;
    returns their keys (none outside a flow run)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return []
    counts = manifest["counts"]
    create_table_artifact(funnel_rows(manifest), key=FUNNEL_KEY,
                          description=f"{manifest['name']}: {counts['input']} rows read, {counts['output']} out")
    out = (manifest.get("config") or {}).get("out")
    create_markdown_artifact(redact(artifact_markdown(report_markdown, out)), key=REPORT_KEY,  # as report.md is
                             description=f"{manifest['name']}: the run's report")
    return [FUNNEL_KEY, REPORT_KEY]
