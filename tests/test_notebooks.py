"""The notebooks: their shape, the report built from them, and each one
executed by nbval at the ``ci`` preset.

nbval runs in a subprocess over a copy of each notebook in a private folder,
so the notebook's default output folder (``../results/notebooks``) lands in
that folder: two test sessions never share run folders, and an earlier
execution's files never count. The notebooks run two at a time.
``--nbval-lax`` runs every cell and compares no output unless a cell asks for
it: the figures are measured, so they vary from run to run; what must hold is
asserted in the notebooks' own cells.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

from benchmarks import charts, notebooks, report
from benchmarks.study import run_key
from reference_impl.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "overview",
    "client",
    "listing",
    "images",
    "upload",
    "encoding",
    "body-limit",
    "allocator",
}
PARAMETERS = {"preset": "ci", "repeats": 1, "out_dir": "../results/notebooks"}


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_one_notebook_per_part_of_the_story():
    assert {notebooks.study_name(p) for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_holds_annotated_literals_only(path: Path):
    tagged = [
        cell
        for cell in read(path).cells
        if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    values = {}
    for statement in ast.parse(tagged[0].source).body:
        assert isinstance(statement, ast.AnnAssign), ast.unparse(statement)
        assert isinstance(statement.value, ast.Constant), ast.unparse(statement)
        values[statement.target.id] = statement.value.value
    assert values == PARAMETERS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(path: Path):
    for cell in read(path).cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], cell.source[:60]
            assert cell.execution_count is None, cell.source[:60]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_opens_with_a_title_and_checks_its_claims(path: Path):
    cells = read(path).cells
    assert cells[0].cell_type == "markdown"
    assert cells[0].source.startswith("# ")
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert "study.save()" in code
    assert "\nassert " in code


def test_notebook_paths_picks_by_name_and_refuses_unknown_names():
    chosen = notebooks.notebook_paths("listing,overview")
    assert [notebooks.study_name(p) for p in chosen] == ["overview", "listing"]
    with pytest.raises(UsageError, match="no notebook named nope"):
        notebooks.notebook_paths("listing,nope")


def test_study_name_drops_the_order_prefix():
    assert notebooks.study_name(Path("06-body-limit.ipynb")) == "body-limit"
    assert notebooks.study_name(Path("scratch.ipynb")) == "scratch"


def test_fit_line_recovers_slope_and_intercept():
    fit = charts.fit_line([1, 2, 4], [12, 14, 18])
    assert fit.slope == pytest.approx(2.0)
    assert fit.intercept == pytest.approx(10.0)
    assert charts.fit_line([3, 3], [5, 7]).slope == 0.0


def test_variant_colours_are_fixed_and_distinct():
    colours = [charts.colour(v) for v in ("naive", "optimized", "optimized-plus")]
    assert len(set(colours)) == 3
    assert charts.colour("optimized", ("upload",)) not in colours
    assert charts.label("optimized", ("upload",)) == "optimized, upload naive"


def test_run_key_names_the_run_and_tells_overrides_apart():
    plain = run_key("upload", "naive+optimized")
    assert plain == "upload-naive+optimized"
    small = run_key("upload", "naive+optimized", overrides={"upload_mib": 2})
    large = run_key("upload", "naive+optimized", overrides={"upload_mib": 8})
    assert small != large and small.startswith(plain)
    assert run_key("clinic", "optimized", naive=("upload",)) == (
        "clinic-optimized-naive-upload"
    )


def _results(folder: Path, name: str, claims, summary) -> None:
    (folder / name).mkdir(parents=True)
    (folder / name / "results.json").write_text(
        json.dumps(
            {
                "notebook": name,
                "preset": "ci",
                "summary": summary,
                "claims": claims,
                "figures": ["rss.png"],
            }
        )
    )


def test_report_tables_the_summary_and_marks_a_failed_notebook(tmp_path: Path):
    _results(
        tmp_path,
        "listing",
        [
            {
                "claim": "Listing fix",
                "verdict": "confirmed",
                "measured": "growth 50 vs 2 MiB",
                "figure": "sweep.png",
                "preset": "ci",
            }
        ],
        [
            {
                "scenario": "listing",
                "peak_naive_mib": 112.0,
                "peak_optimized_mib": 64.0,
                "peak_ratio": 1.75,
                "growth_naive_mib": 50.0,
                "growth_optimized_mib": 2.0,
            }
        ],
    )
    outcomes = [
        report.Outcome("listing", "Pattern listing", True, 12.0, "notebooks/x.ipynb"),
        report.Outcome(
            "upload", "Pattern upload", False, 3.0, "notebooks/y.ipynb", error="boom"
        ),
    ]
    index = report.write(tmp_path, outcomes, "ci", "membench notebooks --preset ci")
    page = index.read_text()
    assert "FAILED" in page and "boom" in page
    assert "<td>listing</td>" in page and "1.8x" in page
    summary = (tmp_path / "summary.md").read_text()
    assert "| listing | 112 | 64 | 1.8x | 50 | 2 | 1 confirmed |" in summary
    claim_row = (
        "| Listing fix | confirmed | growth 50 vs 2 MiB | listing/sweep.png | ci |"
    )
    assert claim_row in summary
    environment = json.loads((tmp_path / "environment.json").read_text())
    assert environment["report_packages"]["papermill"]


def test_running_one_notebook_again_keeps_the_others_in_the_report(tmp_path: Path):
    def outcome(name: str, ok: bool) -> report.Outcome:
        return report.Outcome(name, name, ok, 1.0, f"notebooks/{name}.ipynb")

    first = [outcome("overview", True), outcome("listing", False)]
    notebooks.merge_outcomes(tmp_path, first, "ci")
    merged = notebooks.merge_outcomes(tmp_path, [outcome("listing", True)], "ci")
    assert [(o.name, o.ok) for o in merged] == [("overview", True), ("listing", True)]
    other_preset = notebooks.merge_outcomes(tmp_path, [outcome("upload", True)], "x")
    assert [o.name for o in other_preset] == ["upload"]


def test_membench_notebooks_refuses_a_repeat_count_below_one(tmp_path: Path):
    from reference_impl.cli import main

    assert main(["notebooks", "--preset", "ci", "--repeats", "0"]) == 2


def test_report_only_needs_an_earlier_run(tmp_path: Path, capsys):
    from reference_impl.cli import main

    assert main(["notebooks", "--report-only", "--out", str(tmp_path)]) == 2
    assert "holds no earlier run" in capsys.readouterr().err


def test_report_only_writes_the_report_of_an_earlier_run(tmp_path: Path, capsys):
    from reference_impl.cli import main

    earlier = [report.Outcome("listing", "Listing", True, 1.0, "notebooks/x.ipynb")]
    notebooks.merge_outcomes(tmp_path, earlier, "ci")
    args = ["notebooks", "--preset", "ci", "--report-only", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "Listing" in (tmp_path / "index.html").read_text()
    assert f"report: {tmp_path / 'index.html'}" in capsys.readouterr().out


# -- executed by nbval ---------------------------------------------------------

#: Seconds one notebook may take at the ci preset on a busy 2-core machine.
NOTEBOOK_TIMEOUT_S = 600
#: Notebooks executed side by side. Most of a ci run is fixed cost (a server
#: starting, idle baseline and tail), so two at once take much less time than
#: one after the other; what the notebooks assert is memory, counts and ratios
#: with margins, which a shared CPU does not move.
NBVAL_WORKERS = 2


def nbval_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    for variable, folder in notebooks.CACHE_VARIABLES.items():
        env[variable] = str(cache / folder)
    return env


def run_nbval(path: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    """nbval over a copy of ``path`` in ``folder``/notebooks; the notebook's
    default output folder is then ``folder``/results/notebooks."""
    copy = folder / "notebooks" / path.name
    copy.parent.mkdir(parents=True)
    shutil.copyfile(path, copy)
    (copy.parent / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider\nfilterwarnings = error\n"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbval-lax",
            "--nbval-current-env",
            f"--nbval-cell-timeout={NOTEBOOK_TIMEOUT_S}",
            "-q",
            copy.name,
        ],
        cwd=copy.parent,
        env=nbval_env(folder / "cache"),
        capture_output=True,
        text=True,
        timeout=NOTEBOOK_TIMEOUT_S,
    )


@pytest.fixture(scope="session")
def nbval_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future]]:
    """Every selected notebook's nbval run, started together on
    ``NBVAL_WORKERS`` workers the first time one is asked for."""
    from benchmarks import runner

    selected = {
        item.callspec.params["path"]
        for item in request.session.items
        if item.originalname == "test_notebook_passes_nbval_at_the_ci_preset"
    }
    # Built once here, so that two notebooks never build it side by side.
    runner.ensure_dataset("ci", None, None)
    with ThreadPoolExecutor(max_workers=NBVAL_WORKERS) as pool:
        futures = {}
        for path in sorted(selected):
            folder = tmp_path_factory.mktemp(f"nbval-{path.stem}")
            futures[path.stem] = (folder, pool.submit(run_nbval, path, folder))
        yield futures


@pytest.mark.integration
@pytest.mark.slow
# A test waits for the notebooks queued before its own.
@pytest.mark.timeout(len(NOTEBOOKS) * NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_passes_nbval_at_the_ci_preset(path: Path, nbval_runs):
    folder, future = nbval_runs[path.stem]
    done = future.result()
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    results_dir = folder / "results" / "notebooks" / notebooks.study_name(path)
    results = json.loads((results_dir / "results.json").read_text())
    assert results["preset"] == "ci"
    assert results["figures"], "the notebook wrote no figure"
    for figure in results["figures"]:
        assert (results_dir / figure).stat().st_size > 10_000, figure
