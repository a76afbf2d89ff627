"""Where a run was measured: interpreter, machine, packages, commit, allocator.

Every run.json carries this under ``environment``, so a figure can be traced
to the code and the machine that produced it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from reference_impl.presets import REPO_ROOT

#: Distributions whose versions shape what a run measures.
PACKAGES = (
    "membench",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "starlette",
    "uvicorn",
    "python-multipart",
    "httpx",
    "pillow",
    "psutil",
)

#: glibc malloc's environment knobs; the ones set for the server are recorded.
ALLOCATOR_VARIABLES = (
    "MALLOC_ARENA_MAX",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "PYTHONMALLOC",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


@functools.cache
def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The checked-out commit and whether the tree differs from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def memory_total_mib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def libc() -> str:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        name, version = platform.libc_ver()
        return f"{name} {version}".strip()


def allocator_settings(server_env: dict[str, str]) -> dict[str, Any]:
    """The malloc knobs the server ran with (None: glibc's default)."""
    settings: dict[str, Any] = {"libc": libc()}
    for name in ALLOCATOR_VARIABLES:
        settings[name] = server_env.get(name)
    return settings


def describe(server_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``environment`` block of run.json."""
    commit = git_commit()
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "memory_mib": memory_total_mib(),
        "packages": package_versions(),
        "git_commit": commit["commit"],
        "git_dirty": commit["dirty"],
        "allocator": allocator_settings(server_env or {}),
    }
