"""The project's own files agree with each other: environment.yml with
pyproject.toml, the Makefile with the README, presets with the scenarios."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from reference_impl.config import PATTERNS
from reference_impl.presets import PRESET_NAMES, load_preset

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def environment_entries() -> tuple[list[str], list[str]]:
    """The conda dependencies and the pip entries of environment.yml."""
    conda: list[str] = []
    pip: list[str] = []
    section = None
    for raw in (ROOT / "environment.yml").read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line.startswith(" "):
            section = line.rstrip(":")
            continue
        if section != "dependencies":
            continue
        item = line.strip().removeprefix("- ").strip()
        indent = len(line) - len(line.lstrip())
        if item == "pip:":
            continue
        (pip if indent > 2 else conda).append(item)
    return conda, pip


def test_environment_yml_installs_the_project_through_pip():
    conda, pip = environment_entries()
    names = [re.split(r"[=<>]", entry, maxsplit=1)[0] for entry in conda]
    assert sorted(names) == ["pip", "python"], "declare dependencies in pyproject"
    assert len(pip) == 1
    match = re.fullmatch(r"-e \.\[([a-z,]+)\]", pip[0])
    assert match, pip[0]
    extras = PYPROJECT["project"]["optional-dependencies"]
    for extra in match.group(1).split(","):
        assert extra in extras


def test_environment_python_satisfies_requires_python():
    conda, _ = environment_entries()
    python = next(e for e in conda if e.startswith("python"))
    version = tuple(int(p) for p in python.split("=")[1].split("."))
    required = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert version >= tuple(int(p) for p in required.split("."))


def test_every_dependency_has_a_lower_bound():
    extras = PYPROJECT["project"]["optional-dependencies"].values()
    declared = PYPROJECT["project"]["dependencies"] + [d for e in extras for d in e]
    for dep in declared:
        if dep.startswith("membench["):
            continue
        assert ">=" in dep, f"{dep} has no tested lower bound"


def test_async_sqlalchemy_brings_greenlet():
    deps = PYPROJECT["project"]["dependencies"]
    assert any(d.startswith("sqlalchemy[asyncio]") for d in deps)


def test_datasets_is_not_an_importable_package():
    assert not (ROOT / "datasets" / "__init__.py").exists()
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(not name.startswith("datasets") for name in find)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_presets_give_every_scenario_a_bounded_load(preset):
    loaded = load_preset(preset)
    for scenario in (*PATTERNS, "clinic"):
        load = loaded.load(scenario)
        assert load["requests"] > 0
        assert load["concurrency"] > 0
        assert load["timeout_s"] > 0


def test_readme_commands_are_make_targets():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^\s*make (\w[\w-]*)", readme, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    assert "make bench" in readme
    assert "make test" in readme


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize(
    "command",
    [[], ["dataset", "build"], ["serve"], ["ai-stub"], ["run"], ["notebooks"]],
)
def test_every_subcommand_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "reference_impl", *command, "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: membench" in result.stdout


def test_a_user_mistake_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "reference_impl", "serve", "--naive", "bogus"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown pattern(s) bogus" in result.stderr
    assert "Traceback" not in result.stderr
