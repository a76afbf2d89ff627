"""The HTML report of an executed set of notebooks, and its Markdown twin.

``write(out_dir, outcomes)`` reads each notebook's ``results.json`` and
writes into ``out_dir``:

- ``index.html``: which notebooks ran, a summary table (peak RSS naive
  against optimized per scenario, and the verdicts on the original's
  claims), the overview's charts, links to each executed notebook as HTML;
- ``summary.md``: the same tables in Markdown;
- ``environment.json``: the machine and package versions the runs saw.
"""

from __future__ import annotations

import html
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

#: Packages whose versions the report states beside the measurements.
REPORTED_PACKAGES = (
    "membench",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "aiosqlite",
    "httpx",
    "python-multipart",
    "pillow",
    "psutil",
    "matplotlib",
    "numpy",
    "papermill",
    "nbconvert",
    "ipykernel",
)


@dataclass(frozen=True)
class Outcome:
    """How one notebook's execution went, and where its outputs are."""

    name: str
    title: str
    ok: bool
    duration_s: float
    notebook: str
    html: str | None = None
    error: str = ""


def read_results(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / name / "results.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def summary_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per scenario, each with the verdicts of its notebook's claims."""
    rows = []
    for name, document in results.items():
        verdicts = _verdict_counts(document.get("claims", []))
        for row in document.get("summary", []):
            rows.append({"notebook": name, **row, "verdicts": verdicts})
    return rows


def _verdict_counts(claims: Sequence[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for claim in claims:
        counts[claim["verdict"]] = counts.get(claim["verdict"], 0) + 1
    return ", ".join(f"{n} {verdict}" for verdict, n in counts.items()) or "-"


def all_claims(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"notebook": name, **claim}
        for name, document in results.items()
        for claim in document.get("claims", [])
    ]


def environment(out_dir: Path) -> dict[str, Any]:
    """What a run recorded of its environment, and this process's versions."""
    recorded: dict[str, Any] = {}
    for run_json in sorted(out_dir.glob("*/runs/**/run.json")):
        recorded = json.loads(run_json.read_text()).get("environment", {})
        if recorded:
            break
    versions = {}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on the machine slows requests (latency, throughput) more
        # than it moves memory; the load when the report was written says how
        # busy it was.
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "report_packages": versions,
        "server_environment": recorded,
    }


def write(
    out_dir: Path, outcomes: Sequence[Outcome], preset: str, command: str
) -> Path:
    """Write ``index.html``, ``summary.md`` and ``environment.json``."""
    results = {
        outcome.name: document
        for outcome in outcomes
        if (document := read_results(out_dir, outcome.name)) is not None
    }
    env = environment(out_dir)
    (out_dir / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    (out_dir / "summary.md").write_text(
        markdown(outcomes, results, preset, command, env)
    )
    index = out_dir / "index.html"
    index.write_text(index_html(outcomes, results, preset, command, env))
    return index


# Markdown -------------------------------------------------------------------


def _md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


SUMMARY_HEADER = (
    "scenario",
    "peak naive (MiB)",
    "peak optimized (MiB)",
    "naive / optimized",
    "growth naive (MiB)",
    "growth optimized (MiB)",
    "claims",
)


def _summary_cells(row: dict[str, Any]) -> list[object]:
    return [
        row["scenario"],
        f"{row['peak_naive_mib']:.0f}",
        f"{row['peak_optimized_mib']:.0f}",
        f"{row['peak_ratio']:.1f}x",
        f"{row['growth_naive_mib']:.0f}",
        f"{row['growth_optimized_mib']:.0f}",
        row["verdicts"],
    ]


CLAIMS_HEADER = ("claim", "verdict", "measured", "figure", "preset")


def _claim_cells(claim: dict[str, Any]) -> list[object]:
    return [
        claim["claim"],
        claim["verdict"],
        claim["measured"],
        f"{claim['notebook']}/{claim['figure']}" if claim.get("figure") else "-",
        claim["preset"],
    ]


def markdown(
    outcomes: Sequence[Outcome],
    results: dict[str, dict[str, Any]],
    preset: str,
    command: str,
    env: dict[str, Any],
) -> str:
    parts = [
        f"# membench report, preset `{preset}`",
        "",
        f"Regenerate with `{command}`. Written {env['written_at']} on "
        f"{env['platform']}, Python {env['python']}; load average (1, 5, 15 min)"
        f" {', '.join(str(x) for x in env['load_average_1_5_15_min'])}.",
        "",
        "## Notebooks",
        "",
        _md_table(
            ("notebook", "status", "time (s)", "rendered"),
            [
                (
                    o.title,
                    "ok" if o.ok else f"FAILED: {o.error}",
                    f"{o.duration_s:.0f}",
                    o.html or "-",
                )
                for o in outcomes
            ],
        ),
        "",
        "## Peak RSS, naive against optimized",
        "",
        _md_table(SUMMARY_HEADER, [_summary_cells(r) for r in summary_rows(results)]),
        "",
        "## The original's claims, and what the notebooks add, as measured",
        "",
        _md_table(CLAIMS_HEADER, [_claim_cells(c) for c in all_claims(results)]),
        "",
    ]
    return "\n".join(parts)


# HTML -----------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem;
       color: #222; line-height: 1.45; padding: 0 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #0a6b2d; } .failed { color: #b00020; font-weight: bold; }
.confirmed { background: #e3f4e8; } .partly { background: #fff4d6; }
.refuted { background: #fbe3e3; }
figure { display: inline-block; margin: 0.5rem; }
figure img { max-width: 34rem; border: 1px solid #ddd; }
code { background: #f4f4f4; padding: 0 0.2rem; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _html_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()
) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{v}</td>' if i in numeric else f"<td>{v}</td>"
            for i, v in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def index_html(
    outcomes: Sequence[Outcome],
    results: dict[str, dict[str, Any]],
    preset: str,
    command: str,
    env: dict[str, Any],
) -> str:
    notebook_rows = []
    for o in outcomes:
        status = (
            '<span class="ok">ok</span>'
            if o.ok
            else f'<span class="failed">FAILED</span> {_esc(o.error)}'
        )
        link = (
            f'<a href="{_esc(o.html)}">{_esc(o.title)}</a>' if o.html else _esc(o.title)
        )
        notebook_rows.append(
            [
                link,
                status,
                f"{o.duration_s:.0f}",
                f'<a href="{_esc(o.notebook)}">ipynb</a>',
            ]
        )
    summary = [[_esc(v) for v in _summary_cells(row)] for row in summary_rows(results)]
    claims = []
    for claim in all_claims(results):
        cells = [_esc(v) for v in _claim_cells(claim)]
        if claim.get("figure"):
            target = f"{claim['notebook']}/{claim['figure']}"
            cells[3] = f'<a href="{_esc(target)}">{_esc(claim["figure"])}</a>'
        cells[1] = f'<span class="{_esc(claim["verdict"])}">{cells[1]}</span>'
        claims.append(cells)
    overview = results.get("overview", {})
    figures = "".join(
        f'<figure><a href="overview/{_esc(f)}"><img src="overview/{_esc(f)}" '
        f'alt="{_esc(f)}"></a><figcaption>{_esc(f)}</figcaption></figure>'
        for f in overview.get("figures", [])
    )
    failed = sum(not o.ok for o in outcomes)
    headline = (
        f"{len(outcomes)} notebooks executed, all succeeded."
        if not failed
        else f"{len(outcomes)} notebooks executed, {failed} FAILED."
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>membench report ({_esc(preset)})</title><style>{STYLE}</style></head>
<body>
<h1>membench report, preset <code>{_esc(preset)}</code></h1>
<p>{_esc(headline)} Regenerate with <code>{_esc(command)}</code>.
Written {_esc(env["written_at"])} on {_esc(env["platform"])},
Python {_esc(env["python"])} (<a href="environment.json">environment</a>,
<a href="summary.md">summary as Markdown</a>).</p>
<h2>Notebooks</h2>
{_html_table(("notebook", "status", "time (s)", "executed"), notebook_rows, (2,))}
<h2>Peak RSS, naive against optimized</h2>
{_html_table(SUMMARY_HEADER, summary, (1, 2, 3, 4, 5))}
<h2>The original's claims, and what the notebooks add, as measured</h2>
{_html_table(CLAIMS_HEADER, claims)}
<h2>Overview charts</h2>
{figures or "<p>The overview notebook wrote no charts.</p>"}
</body></html>
"""
