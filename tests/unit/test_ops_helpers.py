import os
import subprocess
import sys
import time

from ops.proc import alive, tail
from ops.simulate import publish_paced


def test_publish_paced_keeps_the_rate_and_stops_on_request():
    got: list[bytes] = []
    sent = [0]
    started = time.monotonic()
    n = publish_paced(got.append, (b"x%d" % i for i in range(40)), rate=200.0, sent=sent)
    elapsed = time.monotonic() - started
    assert n == sent[0] == len(got) == 40
    assert elapsed >= 40 / 200.0 - 0.06  # never ahead of the rate (sleeps only when > 50 ms ahead)
    assert publish_paced(got.append, iter([b"a", b"b"]), rate=1e6, stop=lambda: len(got) >= 41) == 1


def test_alive_checks_command_line_and_zombies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "marker-arg"])
    try:
        # Until the child has exec'd, /proc shows the parent's command line: wait for it (bounded).
        deadline = time.monotonic() + 10
        while not alive(proc.pid, b"marker-arg") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert alive(proc.pid, b"marker-arg")
        assert not alive(proc.pid, b"kafka.Kafka")  # a reused pid running something else is not ours
    finally:
        proc.kill()
    time.sleep(0.2)
    assert not alive(proc.pid)  # killed, not yet reaped: a zombie counts as dead
    proc.wait()
    assert not alive(proc.pid)
    assert alive(os.getpid())


def test_tail(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("\n".join(f"line {i}" for i in range(100)))
    assert tail(log, 2) == "line 98\nline 99"
    assert tail(tmp_path / "missing.log") == ""
