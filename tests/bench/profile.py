"""Optional py-spy sampling of a worker during a measurement, summarised as the top functions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable beside this interpreter, or on PATH; None when absent."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def start(pid: int, out: Path, duration_s: int) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` (collapsed stacks, all threads, non-blocking) on `pid`; None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", "100", "--nonblocking",
           "--format", "raw", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _name(frame: str) -> str:
    # "function (path/to/module.py:123)" → "function (module.py)"
    func, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rsplit("/", 1)[-1] if where else "?"
    return f"{func} ({file})"


def summarize(raw: Path, top: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares (% of samples) of the hottest functions in a py-spy raw (collapsed) file."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    try:
        text = raw.read_text(errors="replace")
    except OSError:
        return {"self": [], "inclusive": []}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames[1:]):  # frames[0] is the thread
            incl[name] += count
    if not total:
        return {"self": [], "inclusive": []}

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in c.most_common(top)]

    return {"self": pct(own), "inclusive": pct(incl)}
