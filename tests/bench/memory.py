"""The process stage's memory per batch: one batch of SDK messages handled at once, or in runs of at most N lines.

`python -m tests.bench.memory` generates the labelled busy stream of tests/bench/detect.py (first `--hours`), packs
it as the SDK does (per partition, ≤ 2,000 events and ≤ 1,000,000 bytes a message), and hands the first
`--messages` messages to streams.pipeline.process_messages on a worker thread, as the process role does: once whole,
then split by streams.roles.context.line_runs for each `--run-lines`. Each setting runs in a process of its own,
`--repeat` times over, and prints µs per event and the process's peak RSS above what the stream itself holds.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import orjson

from streams.records import Source

PARTITIONS = 4


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def sdk_messages(lines: list[bytes], partitions: int, max_events: int = 2000,
                 max_bytes: int = 1_000_000) -> list[tuple[bytes | None, Source]]:
    """The lines packed per partition of their logical id, as SDK batch messages with consecutive offsets."""
    from tally.partitioning import logical_id, partition_for

    parts: dict[int, list[bytes]] = defaultdict(list)
    for line in lines:
        parts[partition_for(logical_id(orjson.loads(line)), partitions)].append(line)
    out: list[tuple[bytes | None, Source]] = []
    for p, group in sorted(parts.items()):
        run: list[bytes] = []
        size = 0
        for line in group:
            if run and (len(run) >= max_events or size + len(line) + 1 > max_bytes):
                out.append((b"\n".join(run), Source("llm.usage.v1", p, len(out))))
                run, size = [], 0
            run.append(line)
            size += len(line) + 1
        if run:
            out.append((b"\n".join(run), Source("llm.usage.v1", p, len(out))))
    return out


def measure(hours: float, messages: int, run_lines: int, repeat: int) -> dict[str, float]:
    """One setting in this process: µs per event and peak RSS (MiB) above the generated stream."""
    from streams.fold import Folder
    from streams.pipeline import FoldStep, process_messages
    from streams.roles.context import line_runs
    from streams.roles.process import fold_config
    from streams.validate import Validator
    from tally.config import Settings
    from tally.reference import snapshot_of
    from tests.bench.detect import labelled_stream, reference_docs
    from tests.bench.detect_stack import stream_lines

    gen, _, _ = labelled_stream(2.5, 3.0, 7)
    batch = sdk_messages(stream_lines(gen, gen.clock + timedelta(hours=hours)), PARTITIONS)[:messages]
    events = sum((v or b"").count(b"\n") + 1 for v, _ in batch)
    settings = Settings()
    validator = Validator(settings.max_line_bytes, settings.max_message_bytes, max_future_skew=timedelta(days=3650))
    snapshot = snapshot_of(reference_docs())
    folder = Folder(fold_config(settings), PARTITIONS)
    state: dict[bytes, bytes] = {}
    step = FoldStep(folder, state, PARTITIONS)
    base = rss_mib()
    peak = base
    cpu = ThreadPoolExecutor(max_workers=1)
    started = time.perf_counter()
    for _ in range(repeat):
        runs = line_runs(batch, run_lines) if run_lines else [batch]
        for run in runs:
            out = cpu.submit(process_messages, run, validator, snapshot, PARTITIONS, datetime.now(UTC), step,
                             time.time()).result()
            for key, value in out.fold_writes.items():
                if value is None:
                    state.pop(key, None)
                else:
                    state[key] = value
            del out
            peak = max(peak, rss_mib())
    elapsed = time.perf_counter() - started
    peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"events": events, "us_per_event": elapsed / (events * repeat) * 1e6, "peak_above_stream_mib": peak - base}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.memory", description=__doc__)
    p.add_argument("--hours", type=float, default=12.0, help="hours of the busy stream generated")
    p.add_argument("--messages", type=int, default=100, help="SDK messages in the batch (process_batch_messages)")
    p.add_argument("--run-lines", default="0,20000,10000,5000", help="0 = the batch at once")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print(orjson.dumps(measure(args.hours, args.messages, args.one, args.repeat)).decode())
        return 0
    print(f"{'run lines':>10} {'events':>8} {'µs/event':>9} {'peak RSS above the stream':>26}")
    for n in (int(x) for x in args.run_lines.split(",")):
        out = subprocess.run([sys.executable, "-m", "tests.bench.memory", "--hours", str(args.hours), "--messages",
                              str(args.messages), "--repeat", str(args.repeat), "--one", str(n)],
                             capture_output=True, check=True, timeout=1800)
        r = orjson.loads(out.stdout.splitlines()[-1])
        print(f"{n or 'all':>10} {r['events']:>8,} {r['us_per_event']:>9.1f} {r['peak_above_stream_mib']:>22,.0f} MiB",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
