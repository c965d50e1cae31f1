"""Local process bookkeeping shared by the broker and worker managers: is a pid ours and alive, a log's tail."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int, *markers: bytes) -> bool:
    """True when `pid` runs, is not a zombie, and its command line holds every marker (so a reused pid is not ours)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    proc_dir = Path(f"/proc/{pid}")
    if not proc_dir.is_dir():
        return True  # no /proc to ask: the signal check is all there is
    try:
        if (proc_dir / "stat").read_text().rpartition(")")[2].split()[0] == "Z":
            return False
        cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return all(any(marker in arg for arg in cmdline) for marker in markers)


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, for error messages ('' when it cannot be read)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
