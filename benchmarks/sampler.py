"""RSS of a server process and its children, sampled from ``/proc``.

The sampler runs as a process of its own (``python -m benchmarks.sampler``),
so the load driver's event loop and GIL never delay a sample, and its own
CPU time is the process's alone. Each tick reads ``/proc/PID/statm`` through
a file descriptor kept open (``pread`` at offset 0: one system call, about
1.5 µs); every ``proc_interval_ms`` a slower tick reads ``/proc/PID/status``
(``VmHWM``, ``Threads``), counts ``/proc/PID/fd`` and looks for children
(``/proc/PID/task/*/children``), whose RSS is added from then on.

What it leaves, when asked to stop (a line or EOF on stdin, or SIGTERM) or
when the server is gone:

- ``rss.csv``: ``t_s,rss_mib``, the server and its children, one row a tick;
- ``proc.csv``: ``t_s,rss_mib,hwm_mib,threads,open_files,children``, one row
  a slow tick;
- a JSON summary (``--summary``): achieved interval, samples, the sampler's
  own CPU time, the last ``VmHWM`` read, whether the server died and when.

Times are seconds since ``--t0``, a ``time.monotonic()`` reading of the
harness: on Linux it is CLOCK_MONOTONIC, one clock for every process.

With ``--limit-mib`` the sampler is also a watchdog: when the server and its
children together hold more than the limit, it kills the server's process
group with SIGKILL, as a container's out-of-memory killer would. It reacts
within one tick, so the server can overshoot the limit by what it allocates
in ~10 ms.

A server that dies keeps every sample taken until then: the sampler notices
(``statm`` unreadable, or all zero for a zombie), stops, and writes its files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024

#: Columns of ``proc.csv``.
PROC_COLUMNS = ("t_s", "rss_mib", "hwm_mib", "threads", "open_files", "children")


def read_status(pid: int) -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` (KiB) and ``Threads`` of ``/proc/PID/status``."""
    wanted = {b"VmHWM:", b"VmRSS:", b"Threads:"}
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as fh:
        for line in fh:
            key, _, rest = line.partition(b"\t")
            if key in wanted:
                out[key[:-1].decode()] = int(rest.split()[0])
    return out


def hwm_mib(pid: int) -> float | None:
    """The kernel's high-water mark of the process's RSS; None once it is gone."""
    try:
        kib = read_status(pid).get("VmHWM")
    except OSError:
        return None
    return None if kib is None else kib / 1024


def children_of(pid: int) -> set[int]:
    """Every descendant of ``pid``, found through each thread's ``children``."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children", "rb") as fh:
                    kids = {int(k) for k in fh.read().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


class _Statm:
    """``/proc/PID/statm`` held open; ``pages()`` is one ``pread``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY)

    def pages(self) -> int:
        """Resident pages; 0 once the process has exited (a zombie holds none)."""
        try:
            return int(os.pread(self.fd, 128, 0).split()[1])
        except (OSError, IndexError, ValueError):
            return 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class SamplerConfig:
    pid: int
    t0: float
    interval_ms: float = 10.0
    proc_interval_ms: float = 200.0
    limit_mib: float | None = None


class Sampler:
    """The sampling loop; ``run()`` blocks until ``stop()`` or the server dies."""

    def __init__(self, config: SamplerConfig) -> None:
        self.config = config
        self.t = array("d")
        self.rss_mib = array("d")
        self.proc_rows: list[tuple[float, float, float | None, int, int, int]] = []
        self.last_hwm_mib: float | None = None
        self.died_at_s: float | None = None
        self.killed_at_s: float | None = None
        self.killed_at_rss_mib: float | None = None
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.max_children = 0
        self._stop = False
        self._server = _Statm(config.pid)
        self._children: dict[int, _Statm] = {}

    def stop(self) -> None:
        self._stop = True

    def _refresh_children(self) -> None:
        current = children_of(self.config.pid)
        for pid in set(self._children) - current:
            self._children.pop(pid).close()
        for pid in current - set(self._children):
            with contextlib.suppress(OSError):
                self._children[pid] = _Statm(pid)
        self.max_children = max(self.max_children, len(self._children))

    def _slow_tick(self, t_s: float, rss_mib: float) -> None:
        pid = self.config.pid
        try:
            status = read_status(pid)
            open_files = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return
        hwm_kib = status.get("VmHWM")
        if hwm_kib is not None:
            self.last_hwm_mib = hwm_kib / 1024
        self._refresh_children()
        self.proc_rows.append(
            (
                t_s,
                rss_mib,
                self.last_hwm_mib,
                status.get("Threads", 0),
                open_files,
                len(self._children),
            )
        )

    def _kill(self, t_s: float, rss_mib: float) -> None:
        self.killed_at_s = t_s
        self.killed_at_rss_mib = rss_mib
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.config.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.config.pid, signal.SIGKILL)

    def run(self) -> None:
        cfg = self.config
        interval_s = cfg.interval_ms / 1000
        slow_every_s = cfg.proc_interval_ms / 1000
        scale = PAGE_BYTES / MIB
        cpu_start = time.process_time()
        wall_start = time.monotonic()
        next_tick = wall_start
        next_slow = wall_start
        try:
            while not self._stop:
                now = time.monotonic()
                pages = self._server.pages()
                if pages == 0:
                    self.died_at_s = now - cfg.t0
                    break
                for child in self._children.values():
                    pages += child.pages()
                rss = pages * scale
                t_s = now - cfg.t0
                self.t.append(t_s)
                self.rss_mib.append(rss)
                if cfg.limit_mib is not None and rss > cfg.limit_mib:
                    self._kill(t_s, rss)
                if now >= next_slow:
                    self._slow_tick(t_s, rss)
                    next_slow = now + slow_every_s
                next_tick += interval_s
                delay = next_tick - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    # Behind schedule (the machine was busy): start afresh
                    # rather than firing a burst of late samples.
                    next_tick = time.monotonic()
        finally:
            self.cpu_s = time.process_time() - cpu_start
            self.wall_s = time.monotonic() - wall_start
            self._server.close()
            for child in self._children.values():
                child.close()

    def intervals_ms(self) -> list[float]:
        return [(b - a) * 1000 for a, b in zip(self.t, self.t[1:], strict=False)]

    def summary(self) -> dict[str, Any]:
        gaps = self.intervals_ms()
        gaps_sorted = sorted(gaps)

        def pick(q: float) -> float | None:
            if not gaps_sorted:
                return None
            return round(gaps_sorted[min(len(gaps_sorted) - 1, int(q * len(gaps)))], 3)

        return {
            "nominal_interval_ms": self.config.interval_ms,
            "interval_ms": round(statistics.fmean(gaps), 3) if gaps else None,
            "interval_p50_ms": pick(0.50),
            "interval_p99_ms": pick(0.99),
            "interval_max_ms": round(gaps_sorted[-1], 3) if gaps else None,
            "samples": len(self.t),
            "cpu_s": round(self.cpu_s, 4),
            "wall_s": round(self.wall_s, 3),
            "cpu_fraction": round(self.cpu_s / self.wall_s, 5) if self.wall_s else None,
            "peak_mib": round(max(self.rss_mib), 3) if self.rss_mib else None,
            "last_hwm_mib": self.last_hwm_mib,
            "max_children": self.max_children,
            "died_at_s": self.died_at_s,
            "killed_at_s": self.killed_at_s,
            "killed_at_rss_mib": self.killed_at_rss_mib,
            "limit_mib": self.config.limit_mib,
        }

    def write_rss_csv(self, path: Path) -> None:
        with path.open("w") as fh:
            fh.write("t_s,rss_mib\n")
            fh.writelines(
                f"{t:.4f},{r:.3f}\n" for t, r in zip(self.t, self.rss_mib, strict=True)
            )

    def write_proc_csv(self, path: Path) -> None:
        with path.open("w") as fh:
            fh.write(",".join(PROC_COLUMNS) + "\n")
            for t_s, rss, hwm, threads, files, kids in self.proc_rows:
                hwm_text = "" if hwm is None else f"{hwm:.3f}"
                fh.write(f"{t_s:.4f},{rss:.3f},{hwm_text},{threads},{files},{kids}\n")


class SamplerProcess:
    """The harness's handle on a sampler process watching one server."""

    def __init__(
        self,
        pid: int,
        out_dir: Path,
        *,
        t0: float,
        interval_ms: float = 10.0,
        proc_interval_ms: float = 200.0,
        limit_mib: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.pid = pid
        self.rss_csv = out_dir / "rss.csv"
        self.proc_csv = out_dir / "proc.csv"
        self.summary_path = out_dir / "sampler.json"
        self.command = [
            sys.executable,
            "-m",
            "benchmarks.sampler",
            "--pid",
            str(pid),
            "--t0",
            repr(t0),
            "--interval-ms",
            str(interval_ms),
            "--proc-interval-ms",
            str(proc_interval_ms),
            "--rss-csv",
            str(self.rss_csv),
            "--proc-csv",
            str(self.proc_csv),
            "--summary",
            str(self.summary_path),
        ]
        if limit_mib is not None:
            self.command += ["--limit-mib", str(limit_mib)]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> SamplerProcess:
        from benchmarks.serverproc import die_with_parent

        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, **(self.env or {})},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        # The first line comes once /proc/PID/statm is open and sampling starts.
        ready = _readline(self.proc, timeout_s)
        if ready.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the sampler of pid {self.pid} did not start")
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any] | None:
        """Ask the sampler to write its files; its summary, or None if it wrote none."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b"stop\n")
                proc.stdin.flush()
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if not self.summary_path.is_file():
            return None
        return json.loads(self.summary_path.read_text())


def _readline(proc: subprocess.Popen[bytes], timeout_s: float) -> bytes:
    line: list[bytes] = []
    reader = threading.Thread(
        target=lambda: line.append(proc.stdout.readline()), daemon=True
    )
    reader.start()
    reader.join(timeout_s)
    return line[0] if line else b""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sampler", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument(
        "--t0", type=float, help="time.monotonic() of time zero (default: now)"
    )
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--proc-interval-ms", type=float, default=200.0)
    parser.add_argument("--limit-mib", type=float, help="kill the server above this")
    parser.add_argument("--rss-csv", type=Path, required=True)
    parser.add_argument("--proc-csv", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    config = SamplerConfig(
        pid=args.pid,
        t0=args.t0 if args.t0 is not None else time.monotonic(),
        interval_ms=args.interval_ms,
        proc_interval_ms=args.proc_interval_ms,
        limit_mib=args.limit_mib,
    )
    try:
        sampler = Sampler(config)
    except OSError as exc:
        print(f"sampler: cannot read process {args.pid}: {exc}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sampler.stop())
    # Ctrl-C reaches the harness, which stops the sampler once its files are due.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def wait_for_stop() -> None:
        # Blocks in read() without the GIL; a line or EOF (the harness gone)
        # ends the sampling.
        sys.stdin.readline()
        sampler.stop()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    print("ready", flush=True)
    sampler.run()
    sampler.write_rss_csv(args.rss_csv)
    sampler.write_proc_csv(args.proc_csv)
    args.summary.write_text(json.dumps(sampler.summary(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
