"""A bare Faust agent that drains a topic (split NDJSON lines, orjson-decode, count): the Faust baseline.

Run as `python -m tests.bench.bare_faust --bootstrap … --topic … --expected N --out FILE --group G --datadir D`.
When N events have been counted it writes one JSON object to FILE (count, messages, wall times of the partition
assignment and of the first and last event, batch timings) and keeps running until SIGTERM, as `tally worker` would.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import faust
import orjson


def build_app(args: argparse.Namespace) -> faust.App:
    """The minimal app: own group id, raw values, take_events(200, 0.2) like the process agent."""
    app = faust.App(
        args.group,
        broker=f"kafka://{args.bootstrap}",
        value_serializer="raw",
        key_serializer="raw",
        store="memory://",
        topic_partitions=args.partitions,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        datadir=args.datadir,
    )
    topic = app.topic(args.topic, value_type=bytes)
    out = Path(args.out)
    state: dict[str, Any] = {"count": 0, "messages": 0, "assigned": 0.0, "first": 0.0, "first_batch_end": 0.0,
                             "first_batch_events": 0, "last": 0.0, "batches": 0, "written": False}
    loads = orjson.loads

    async def on_assigned(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        if not state["assigned"]:
            state["assigned"] = time.time()

    app.on_partitions_assigned.connect(on_assigned)

    @app.agent(topic)
    async def drain(stream: faust.StreamT) -> None:
        async for events in stream.take_events(200, 0.2):  # type: ignore[attr-defined]
            began = time.time()
            n = 0
            for e in events:
                for line in (e.message.value or b"").split(b"\n"):
                    loads(line)
                    n += 1
            ended = time.time()
            if not state["batches"]:
                state["first"], state["first_batch_end"], state["first_batch_events"] = began, ended, n
            state["batches"] += 1
            state["count"] += n
            state["messages"] += len(events)
            state["last"] = ended
            if state["count"] >= args.expected and not state["written"]:
                state["written"] = True
                tmp = out.with_suffix(".tmp")
                tmp.write_bytes(orjson.dumps({k: v for k, v in state.items() if k != "written"}))
                tmp.rename(out)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--expected", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--datadir", required=True)
    args = parser.parse_args()
    os.makedirs(args.datadir, exist_ok=True)
    sys.argv = [sys.argv[0]]  # faust.Worker reads argv; ours are consumed
    worker = faust.Worker(build_app(args), loglevel="WARNING", quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    main()
