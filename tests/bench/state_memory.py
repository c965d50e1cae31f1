"""A worker's state in memory: N open logical requests in the fold state and M features' detectors, one process.

`python -m tests.bench.state_memory [--open-requests N] [--features M]` prints one JSON line: the process's RSS
before (imports and the reference data), after the fold state holds N open requests (each one non-final attempt
of a bench event, so it stays open), and after M features' detectors have seen ten minutes of traffic (one request
a feature a minute, the windows closed by the detectors' clock), with its peak (VmHWM). The fold state is held as
the process role holds it (bytes per key in a dict, Faust's memory store), built in batches of 10,000 rows.
`make bench` runs it in a process of its own (tests/bench/run.py), so nothing else is counted; a worker adds Faust
and its Kafka clients (~100-200 MiB) to the first figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from streams.detect import DetectConfig, Detector
from streams.fold import FoldConfig, Folder, apply_writes
from tests.bench.common import EventPool
from tests.bench.stages import open_request_rows, priced_rows
from tests.factories import request_row


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(open_requests: int, features: int, batch: int = 10_000, partitions: int = 4) -> dict[str, Any]:
    """The figures of the module's docstring, as a dict."""
    now = datetime.now(UTC)
    template = priced_rows(EventPool(2000, partitions), partitions, now)
    base = _rss_mib()
    folder, state = Folder(FoldConfig(), partitions), {}
    t0 = time.perf_counter()
    for start in range(0, open_requests, batch):
        rows = open_request_rows(template, start, min(open_requests, start + batch), partitions)
        res = folder.fold(rows, state, time.time(), now)
        apply_writes(state, res.writes)
    fold_s = time.perf_counter() - t0
    if len(state) != open_requests:
        raise RuntimeError(f"expected {open_requests} open requests, the state holds {len(state)}")
    with_fold = _rss_mib()
    detector = Detector(DetectConfig())
    start_ts = now - timedelta(hours=1)
    t0 = time.perf_counter()
    for minute in range(10):
        ts = start_ts + timedelta(minutes=minute)
        detector.observe([request_row(ts, feature_id=f"feature-{i:05d}", logical_request_id=f"lr-{minute}-{i}")
                          for i in range(features)], 0)
        detector.advance(0, (ts + timedelta(seconds=59)).timestamp())
    detect_s = time.perf_counter() - t0
    with_detectors = _rss_mib()
    return {"open_requests": open_requests, "features": features,
            "rss_base_mib": round(base, 1), "rss_with_fold_mib": round(with_fold, 1),
            "rss_with_detectors_mib": round(with_detectors, 1), "rss_peak_mib": round(_rss_mib("VmHWM"), 1),
            "state_value_bytes": round(sum(map(len, state.values())) / open_requests),
            "fold_s": round(fold_s, 1), "detect_s": round(detect_s, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.state_memory", description=__doc__)
    p.add_argument("--open-requests", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=10_000)
    args = p.parse_args(argv)
    print(orjson.dumps(measure(args.open_requests, args.features)).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
