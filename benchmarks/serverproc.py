"""A server as its own process: started in its own session, ready when it
answers, stopped by process group so no child outlives it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

log = logging.getLogger("benchmarks")


#: Every process the harness starts carries this variable in its environment,
#: so what a run left behind can be found (and stopped) by its value.
RUN_MARKER_ENV = "MEMBENCH_RUN_ID"

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """Raised when a server process fails to start or to answer."""


def die_with_parent() -> None:
    """In a child before exec: be killed when the parent dies, even by SIGKILL.

    Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op. The signal is tied
    to the thread that forked, so start children from a thread that outlives
    them (the main thread does).
    """
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment holds ``RUN_MARKER_ENV=marker``."""
    needle = f"{RUN_MARKER_ENV}={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rpartition(b")")[2].split()[0]
        except OSError:
            continue
        if needle in environ and state != b"Z":
            found.append(int(entry))
    return found


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every live process carrying ``marker``; the pids signalled."""
    pids = [pid for pid in marked_processes(marker) if pid != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return pids


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def membench_command(*args: str) -> list[str]:
    """``membench ARGS`` run by this interpreter, so it works outside a venv's PATH."""
    return [sys.executable, "-m", "reference_impl", *args]


def serve_args(
    variant: str,
    *,
    port: int,
    naive: Sequence[str] = (),
    dataset: Path | None = None,
    db: str | None = None,
    storage: Path | None = None,
    ai_url: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    args = ["serve", "--variant", variant, "--port", str(port)]
    if naive:
        args += ["--naive", ",".join(naive)]
    if dataset is not None:
        args += ["--dataset", str(dataset)]
    if db is not None:
        args += ["--db", db]
    if storage is not None:
        args += ["--storage", str(storage)]
    if ai_url is not None:
        args += ["--ai-url", ai_url]
    return membench_command(*args, *extra)


class ServerProcess:
    """One server process. Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        health_path: str = "/healthz",
        preexec_fn=None,
    ) -> None:
        self.command = list(command)
        self.host = host
        self.port = port
        self.env = env
        self.log_path = log_path
        self.health_path = health_path
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError("the server was never started")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 60.0) -> ServerProcess:
        self.launch()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to answer."""
        env = {**os.environ, **(self.env or {})}
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = self.log_path.open("ab")
        out = self._log_file if self._log_file is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            self.command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=self._preexec,
        )
        log.debug("started pid %s: %s", self.proc.pid, " ".join(self.command))
        return self

    def _preexec(self) -> None:
        # Runs in the child between fork and exec: a harness killed outright
        # takes its server with it.
        die_with_parent()
        if self.preexec_fn is not None:
            self.preexec_fn()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once the health route answers 200; ServerError otherwise."""
        deadline = time.perf_counter() + timeout_s
        url = self.base_url + self.health_path
        while time.perf_counter() < deadline:
            if not self.alive():
                raise ServerError(
                    f"server exited with code {self.proc.returncode} before it answered"
                    f"{self._log_hint()}"
                )
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise ServerError(f"server did not answer {url} within {timeout_s} s")

    def _log_hint(self) -> str:
        return f" (log: {self.log_path})" if self.log_path else ""

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL it if it lingers; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=timeout_s)
            # Children that outlived a killed parent still carry its group id.
            _signal_group(proc.pid, signal.SIGKILL)
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
        return proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
