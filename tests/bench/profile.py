"""Optional py-spy sampling of a worker during a measurement, summarised per thread and per function."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_PROJECT_DIRS = ("streams/", "tally/", "ops/")
_ENTRY = ("<module> (", "main (cli.py)", "worker (cli.py)", "run_worker (")


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH; None when absent."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def start(pid: int, out: Path, duration_s: int) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` (collapsed stacks, non-idle samples of all threads) on `pid`; None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "100", "--nonblocking",
           "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _split(frame: str) -> tuple[str, str]:
    """'func (path/to/mod.py:12)' → ('func (mod.py)', 'path/to/mod.py')."""
    func, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0] if where else "?"
    return f"{func} ({path.rsplit('/', 1)[-1]})", path


def _is_project(path: str) -> bool:
    return "site-packages" not in path and any(path.startswith(d) or f"/{d}" in path for d in _PROJECT_DIRS)


def _thread(frames: list[str]) -> str:
    head = frames[0]
    if head.startswith("_run_module_as_main"):
        return "main (event loop)"
    text = ";".join(frames[:6])
    if "WorkerThread.run" in text:
        return "consumer thread"
    if "_worker (" in text and "thread.py" in text:
        return "executor thread"
    return "other/partial stack"


def summarize(raw: Path, top: int = 12) -> dict[str, Any]:
    """Shares (% of all non-idle samples) per thread, of the hottest leaf functions, and of project functions
    including their callees, from a py-spy raw (collapsed-stack) file.
    """
    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    project: Counter[str] = Counter()
    total = 0
    try:
        text = raw.read_text(errors="replace")
    except OSError:
        return {}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        named = [_split(f) for f in frames]
        thread = _thread(frames)
        total += count
        threads[thread] += count
        leaves[f"{named[-1][0]} [{thread}]"] += count
        for name in {n for n, path in named if _is_project(path) and not n.startswith(_ENTRY)}:
            project[name] += count
    if not total:
        return {}

    def pct(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * k / total, 1)) for name, k in c.most_common(n)]

    return {"samples": total, "threads": dict(pct(threads, 10)), "top_self": pct(leaves, top),
            "project_inclusive": pct(project, top)}


def render(summary: dict[str, Any]) -> str:
    """A few indented lines for the console."""
    if not summary:
        return "      (no profile samples)"
    out = [f"      {summary['samples']} samples; threads: "
           + ", ".join(f"{k} {v}%" for k, v in summary["threads"].items())]
    out.append("      hottest leaves: " + "; ".join(f"{k} {v}%" for k, v in summary["top_self"]))
    out.append("      project functions incl. callees: "
               + "; ".join(f"{k} {v}%" for k, v in summary["project_inclusive"]))
    return "\n".join(out)
