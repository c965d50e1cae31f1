"""The default stack's layout: the sink, then process workers, each an OS process with its own pid and log file."""

import os
import subprocess
import sys

import pytest

from ops import stack
from tally.config import Settings


def test_the_default_layout_is_the_sink_then_n_process_workers():
    assert stack.layout(1) == ["sink", "process"]
    assert stack.layout(3) == ["sink", "process", "process-2", "process-3"]
    assert [stack.role_of(n) for n in stack.layout(3)] == ["sink", "process", "process", "process"]
    with pytest.raises(stack.StackError, match="at least 1"):
        stack.layout(0)


def test_default_workers_leave_the_sink_a_core(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert stack.default_workers() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert stack.default_workers() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert stack.default_workers() == 1


def test_up_takes_a_role_or_a_worker_count_not_both(tmp_path):
    with pytest.raises(stack.StackError, match="not both"):
        stack.up(Settings(data_dir=tmp_path), role="all", workers=2)


def test_running_workers_lists_live_workers_by_name_and_down_stops_process_workers_first(tmp_path, monkeypatch):
    settings = Settings(data_dir=tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    procs = {name: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for name in ("sink", "process", "process-2")}
    try:
        for name, proc in procs.items():
            (run / f"worker-{name}.pid").write_text(str(proc.pid))
        (run / "worker-all.pid").write_text("999999999")  # a worker that is gone
        monkeypatch.setattr(stack, "_alive", lambda pid: any(p.pid == pid and p.poll() is None
                                                             for p in procs.values()))
        assert stack.running_workers(settings) == {name: p.pid for name, p in sorted(procs.items())}
        assert stack.stop_workers(settings) == ["process", "process-2", "sink"]
        assert all(p.wait(timeout=10) is not None for p in procs.values())
        assert stack.running_workers(settings) == {}
        assert sorted(f.name for f in run.iterdir()) == ["worker-all.pid"]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
