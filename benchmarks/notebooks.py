"""Execute every notebook with papermill at a preset, then write an HTML report.

Each notebook runs in the notebooks folder, on the ``python3`` kernel of the
interpreter running this command, with its ``parameters`` cell set to the
preset and output folder given here. Executed notebooks land in
``OUT/notebooks/`` as ``.ipynb`` and ``.html``; their charts and results in
``OUT/<notebook>/``; the report in ``OUT/index.html``. A failed notebook is
marked in the report and the command exits 1 after the others have run.
With ``--only``, the report keeps the other notebooks of an earlier run at the
same preset into the same folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import time
from pathlib import Path

from reference_impl.errors import UsageError
from reference_impl.presets import PRESET_NAMES, REPO_ROOT

log = logging.getLogger("benchmarks")

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "python3"
#: Where kernels, matplotlib and nbformat keep caches, instead of the home folder.
CACHE_VARIABLES = {
    "MPLCONFIGDIR": "matplotlib",
    "IPYTHONDIR": "ipython",
    "JUPYTER_CONFIG_DIR": "jupyter-config",
    "JUPYTER_DATA_DIR": "jupyter-data",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="default",
        choices=PRESET_NAMES,
        help="scale every notebook measures at (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="report folder (default: reports/PRESET)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="N",
        help="runs of each measurement; figures show the median (default: 1)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="NAME,...",
        help="comma-separated notebook names to run (default: all)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="execute nothing: write the report again from the notebooks an"
        " earlier run left in DIR",
    )
    parser.add_argument(
        "--cell-timeout-s",
        type=float,
        default=3600.0,
        metavar="S",
        help="a cell running longer than this fails its notebook",
    )


def notebook_paths(only: str = "") -> list[Path]:
    """The notebooks in story order (their file names start with a number)."""
    paths = sorted(
        p for p in NOTEBOOKS_DIR.glob("*.ipynb") if not p.name.startswith(".")
    )
    if not only:
        return paths
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    chosen = [p for p in paths if p.stem in wanted or study_name(p) in wanted]
    missing = wanted - {p.stem for p in chosen} - {study_name(p) for p in chosen}
    if missing:
        known = ", ".join(study_name(p) for p in paths)
        raise UsageError(
            f"no notebook named {', '.join(sorted(missing))}; known: {known}"
        )
    return chosen


def study_name(path: Path) -> str:
    """``03-images.ipynb`` -> ``images``: the folder its results go to."""
    stem = path.stem
    head, _, tail = stem.partition("-")
    return tail if head.isdigit() and tail else stem


def notebook_title(path: Path) -> str:
    """The first Markdown heading of the notebook, or its name."""
    document = json.loads(path.read_text())
    for cell in document.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        for line in "".join(cell.get("source", [])).splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return path.stem


def prepare_environment() -> None:
    """The kernel inherits this process's environment: give it cache folders
    and the inline backend (``MPLBACKEND=Agg`` would drop every figure)."""
    cache = REPO_ROOT / ".cache"
    for variable, folder in CACHE_VARIABLES.items():
        os.environ.setdefault(variable, str(cache / folder))
        Path(os.environ[variable]).mkdir(parents=True, exist_ok=True)
    os.environ.pop("MPLBACKEND", None)


def execute(
    path: Path, out_dir: Path, preset: str, repeats: int, cell_timeout_s: float
):
    """Run one notebook with papermill; the executed copy is written even when
    a cell fails."""
    import papermill
    from nbclient.exceptions import CellTimeoutError

    from benchmarks.report import Outcome

    executed = out_dir / "notebooks" / path.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = ""
    log.info("executing %s at preset %s", path.name, preset)
    try:
        papermill.execute_notebook(
            str(path),
            str(executed),
            parameters={"preset": preset, "repeats": repeats, "out_dir": str(out_dir)},
            kernel_name=KERNEL_NAME,
            cwd=str(path.parent),
            execution_timeout=cell_timeout_s,
            progress_bar=False,
        )
    except papermill.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue}"
    except CellTimeoutError as exc:
        error = f"a cell ran over {cell_timeout_s:g} s ({exc})"
    elapsed_s = time.perf_counter() - start
    if error:
        log.error("%s failed after %.0f s: %s", path.name, elapsed_s, error)
    else:
        log.info("%s done in %.0f s", path.name, elapsed_s)
    page = to_html(executed) if executed.is_file() else None
    return Outcome(
        name=study_name(path),
        title=notebook_title(path),
        ok=not error,
        duration_s=elapsed_s,
        notebook=str(executed.relative_to(out_dir)),
        html=str(page.relative_to(out_dir)) if page else None,
        error=error,
    )


def to_html(notebook: Path) -> Path:
    """Render an executed notebook as one self-contained HTML page."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _resources = HTMLExporter().from_notebook_node(
        nbformat.read(notebook, as_version=4)
    )
    page = notebook.with_suffix(".html")
    page.write_text(body, encoding="utf-8")
    return page


def main(args: argparse.Namespace) -> int:
    from benchmarks import report

    if args.repeats < 1:
        raise UsageError(f"--repeats={args.repeats} must be at least 1")
    out_dir = (args.out or REPO_ROOT / "reports" / args.preset).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only and not (out_dir / OUTCOMES_FILE).is_file():
        raise UsageError(f"{out_dir} holds no earlier run to report on")
    paths = [] if args.report_only else notebook_paths(args.only)
    if paths:
        prepare_environment()
    fresh = [
        execute(path, out_dir, args.preset, args.repeats, args.cell_timeout_s)
        for path in paths
    ]
    outcomes = merge_outcomes(out_dir, fresh, args.preset)
    command = " ".join(
        [
            "membench notebooks",
            "--preset",
            args.preset,
            "--out",
            shlex.quote(_shown(out_dir)),
        ]
    )
    index = report.write(out_dir, outcomes, args.preset, command)
    failed = [o.name for o in fresh if not o.ok]
    print(f"report: {index}")
    if failed:
        print(f"failed notebooks: {', '.join(failed)}")
        return 1
    return 0


OUTCOMES_FILE = "outcomes.json"


def merge_outcomes(out_dir: Path, fresh: list, preset: str) -> list:
    """This run's outcomes, and, for the notebooks it did not run, those an
    earlier run at the same preset left in ``out_dir``: running one notebook
    again (``--only``) keeps the others in the report. Saved for the next."""
    from dataclasses import asdict

    from benchmarks.report import Outcome

    path = out_dir / OUTCOMES_FILE
    earlier = {}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("preset") == preset:
            earlier = {o["name"]: Outcome(**o) for o in saved["outcomes"]}
    earlier.update({o.name: o for o in fresh})
    order = [study_name(p) for p in notebook_paths()]
    merged = sorted(
        earlier.values(),
        key=lambda o: order.index(o.name) if o.name in order else len(order),
    )
    path.write_text(
        json.dumps(
            {"preset": preset, "outcomes": [asdict(o) for o in merged]}, indent=2
        )
        + "\n"
    )
    return merged


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
