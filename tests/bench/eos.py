"""Issue 12, item 2: the process role's commit protocol, tally's own positions vs Kafka transactions, on one broker.

Every protocol runs the same synthetic batches on the real local broker, with confluent-kafka for all (so the
difference measured is the protocol, not the client):

- input: a real 3-partition topic read by a real consumer group (subscribe, assignment). An input message stands for
  an SDK batch message of up to 500 events (its value is only the event count: decoding and pricing cost the same
  in every protocol and are left out); a batch of N events takes ceil(N / 500) input messages;
- outputs: per input message, its events as ~560-byte NDJSON lines on the same partition number of a 3-partition
  output topic, packed with `pack_ndjson` up to `OUTPUT_MESSAGE_BYTES` (900 KiB) as streams/app.py does;
- state: 0.11 fold-state records per event of 1,032 bytes (the fold's figures from the stage bench, docs/performance.md,
  first table) to a compacted 3-partition changelog, on the input message's partition.

current (tally today): acks=all, linger 5 ms, no idempotence (the app's Faust producer); produce the outputs and
wait for every delivery report, then the state records plus one position entry per input partition
(`\\x00position:<p>` = last input offset) to the changelog, and wait again. The input group auto-commits every
second (a lag hint only, as Faust's commit interval).

transactions (EOS v2 style): one transactional producer per runner (transactional.id), linger 5 ms;
begin_transaction, produce the outputs and the state records (no position entries: the position is the group's
offset), send_offsets_to_transaction(last offset + 1 per consumed partition, consumer_group_metadata()),
commit_transaction. The input consumer does not auto-commit. Measured with librdkafka's defaults and again with
retry.backoff.ms = 10 (see PROTOCOLS).

Per batch: commit latency = from the first output produce (current) or begin_transaction (transactions) to the last
delivery report / commit_transaction returning. batches/s and events/s count the whole loop (input consume included). A
downstream consumer thread per protocol (read_uncommitted for current, read_committed for transactions; default fetch
settings) reads the output topic from its beginning; visibility = from an output message's produce call (a header) to
that consumer receiving it. Per batch size each protocol runs twice for half the time, in the order ORDER (first to
last, then back), so drift on a shared machine weighs on all of them.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.positions import encode_offset, position_key
from tally.sdk.batching import pack_ndjson
from tests.bench.common import quantile

PARTITIONS = 3
LINE_BYTES = 560
OUTPUT_MESSAGE_BYTES = 900 * 1024  # streams.app.OUTPUT_MESSAGE_BYTES (not imported: that module builds Faust)
SDK_MESSAGE_EVENTS = 500
STATE_WRITES_PER_EVENT = 0.11
STATE_VALUE_BYTES = 1032
WARMUP_BATCHES = 3
TIMEOUT_S = 30.0
# protocol → producer settings over the defaults. librdkafka retries a transactional request refused with
# CONCURRENT_TRANSACTIONS (a back-to-back transaction's AddPartitionsToTxn / AddOffsetsToTxn while the broker still
# writes the previous one's markers) after retry.backoff.ms, 100 ms by default; the Java client waits 20 ms there.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "current": {},
    "transactions": {},
    "transactions_retry10": {"retry.backoff.ms": 10},
}
ORDER = ("current", "transactions", "transactions_retry10", "transactions_retry10", "transactions", "current")


def _line(n: int) -> bytes:
    """One synthetic attempt line of exactly LINE_BYTES bytes (distinct ids; JSON-shaped, uncompressed anyway)."""
    head = (f'{{"event_id":"ev-{n:012d}","request_id":"rq-{n // 2:012d}","tenant_id":"t-{n % 97}",'
            f'"feature_id":"f-{n % 13}","model":"m-{n % 5}","cost_usd":"0.{n % 9973:06d}","pad":"').encode()
    return head + b"x" * (LINE_BYTES - len(head) - 2) + b'"}'


LINES = [_line(n) for n in range(SDK_MESSAGE_EVENTS)]
STATE_VALUE = b"{" + b"s" * (STATE_VALUE_BYTES - 2) + b"}"


def _check(failures: list[str]) -> Callable[[KafkaError | None, Message], None]:
    def delivered(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            failures.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")
    return delivered


def _create_topics(bootstrap: str, names: dict[str, dict[str, str]]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, num_partitions=PARTITIONS, replication_factor=1, config=cfg)
                                   for n, cfg in names.items()], operation_timeout=TIMEOUT_S)
    for fut in futures.values():
        fut.result(TIMEOUT_S)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=TIMEOUT_S)
        if all(n in md.topics and len(md.topics[n].partitions) == PARTITIONS for n in names):
            return
        time.sleep(0.05)
    raise RuntimeError(f"topics not visible after {TIMEOUT_S:.0f}s: {sorted(names)}")


def _prefill(bootstrap: str, topic: str, sizes: list[int]) -> None:
    """Input messages (value: the event count each stands for), round-robin over the partitions."""
    failures: list[str] = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20})
    cb = _check(failures)
    for i, events in enumerate(sizes):
        producer.produce(topic, value=str(events).encode(), partition=i % PARTITIONS, on_delivery=cb)
        if i % 5000 == 0:
            producer.poll(0)
    if producer.flush(TIMEOUT_S) or failures:
        raise RuntimeError(f"prefilling {topic} failed: {failures[:3]}")


class Downstream:
    """A consumer thread on the output topic (from its beginning) noting produce → receive per message."""

    def __init__(self, bootstrap: str, topic: str, isolation: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-eos-down-{uuid.uuid4().hex[:6]}",
                                  "enable.auto.commit": False, "isolation.level": isolation,
                                  "auto.offset.reset": "earliest"})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        self.latencies_ms: list[float] = []
        self.seen = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"downstream-{isolation}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            first = self.consumer.poll(0.1)  # returns at the first message (consume() would wait for a full batch)
            if first is None:
                continue
            now = time.perf_counter_ns()
            msgs = [first, *self.consumer.consume(1000, 0)]
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF and len(self.errors) < 5:
                        self.errors.append(err.str())
                    continue
                sent = dict(m.headers() or []).get("t")
                if sent is not None:
                    self.latencies_ms.append((now - int(sent)) / 1e6)
                self.seen += 1

    def wait_for(self, count: int, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.seen < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"downstream saw {self.seen} of {count} output messages in {timeout:.0f}s "
                                   f"({self.errors})")
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


@dataclass
class Runner:
    """One protocol on its own input group, output topic, changelog and downstream consumer."""

    protocol: str
    bootstrap: str
    input_topic: str
    events: int  # per batch
    tag: str
    producer_extra: dict[str, Any] = field(default_factory=dict)
    commit_ms: list[float] = field(default_factory=list)
    # the commit's two steps: outputs delivered | state and position delivered (current);
    # begin, produce, send_offsets_to_transaction | commit_transaction (transactions)
    first_ms: list[float] = field(default_factory=list)
    second_ms: list[float] = field(default_factory=list)
    batches: int = 0
    loop_s: float = 0.0
    produced: int = 0  # output messages
    output_bytes: int = 0
    state_records: int = 0
    init_s: float = 0.0
    events_done: int = 0
    produced_before: int = 0
    _state_due: float = 0.0
    _keys: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.transactional = self.protocol.startswith("transactions")
        self.output = f"bench-eos-{self.tag}-{self.protocol}-out"
        self.changelog = f"bench-eos-{self.tag}-{self.protocol}-state"
        _create_topics(self.bootstrap, {self.output: {}, self.changelog: {"cleanup.policy": "compact"}})
        self.failures: list[str] = []
        self.delivered = _check(self.failures)
        self.group = f"bench-eos-{self.tag}-{self.protocol}"
        self.consumer = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": self.group, "auto.offset.reset": "earliest",
            "enable.auto.commit": not self.transactional, "auto.commit.interval.ms": 1000,
        })
        assigned = threading.Event()
        self.consumer.subscribe([self.input_topic], on_assign=lambda c, parts: assigned.set())
        deadline = time.monotonic() + TIMEOUT_S
        while not assigned.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(f"group {self.group} got no assignment in {TIMEOUT_S:.0f}s")
            self.consumer.poll(0.1)  # joins the group; no message is fetched before the assignment
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap, "acks": "all", "linger.ms": 5,
                                "message.max.bytes": 4 * 1024 * 1024}
        if self.transactional:
            conf["transactional.id"] = f"bench-eos-{self.tag}-{self.protocol}"
        else:
            conf["enable.idempotence"] = False
        conf.update(self.producer_extra)
        self.producer = Producer(conf)
        if self.transactional:
            began = time.perf_counter()
            self.producer.init_transactions(TIMEOUT_S)
            self.init_s = time.perf_counter() - began
        self.downstream = Downstream(self.bootstrap, self.output,
                                     "read_committed" if self.transactional else "read_uncommitted")

    def _input(self) -> list[Message]:
        want = math.ceil(self.events / SDK_MESSAGE_EVENTS)
        got: list[Message] = []
        deadline = time.monotonic() + TIMEOUT_S
        while len(got) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.group}: {len(got)} of {want} input messages in {TIMEOUT_S:.0f}s")
            got += [m for m in self.consumer.consume(want - len(got), 1.0) if m.error() is None]
        return got

    def _produce_outputs(self, inputs: list[Message]) -> None:
        for msg in inputs:
            count = int(msg.value() or b"0")
            for chunk in pack_ndjson(LINES[:count], OUTPUT_MESSAGE_BYTES):
                self.producer.produce(self.output, value=chunk, partition=msg.partition() or 0,
                                      headers={"t": str(time.perf_counter_ns()).encode()},
                                      on_delivery=self.delivered)
                self.produced += 1
                self.output_bytes += len(chunk)

    def _produce_state(self, inputs: list[Message]) -> None:
        for msg in inputs:
            self._state_due += STATE_WRITES_PER_EVENT * int(msg.value() or b"0")
            while self._state_due >= 1:
                self._state_due -= 1
                key = f"lr-{self.tag}-{next(self._keys)}".encode()
                self.producer.produce(self.changelog, key=key, value=STATE_VALUE, partition=msg.partition() or 0,
                                      on_delivery=self.delivered)
                self.state_records += 1

    def _await_deliveries(self) -> None:
        """Serve delivery reports until every message produced so far is acknowledged, as the app awaits its futures.

        Not flush(): librdkafka's flush sends at once, cutting linger.ms short, which the app's awaits do not.
        """
        deadline = time.monotonic() + TIMEOUT_S
        while len(self.producer) and time.monotonic() < deadline:
            self.producer.poll(0.05)  # returns at the first delivery report
        if len(self.producer) or self.failures:
            raise RuntimeError(f"{self.protocol}: {len(self.producer)} undelivered; {self.failures[:3]}")

    def batch(self) -> float:
        """Consume one input batch and commit its outputs, state and position; returns the commit latency (ms)."""
        inputs = self._input()
        self.events_done += sum(int(m.value() or b"0") for m in inputs)
        last: dict[int, int] = {}
        for m in inputs:
            last[m.partition() or 0] = max(last.get(m.partition() or 0, -1), m.offset() or 0)
        began = time.perf_counter()
        if self.transactional:
            self.producer.begin_transaction()
            self._produce_outputs(inputs)
            self._produce_state(inputs)
            self.producer.send_offsets_to_transaction(
                [TopicPartition(self.input_topic, p, o + 1) for p, o in last.items()],
                self.consumer.consumer_group_metadata(), TIMEOUT_S)
            middle = time.perf_counter()
            self.producer.commit_transaction(TIMEOUT_S)
            if self.failures:
                raise RuntimeError(f"transactions: {self.failures[:3]}")
        else:
            self._produce_outputs(inputs)
            self._await_deliveries()
            middle = time.perf_counter()
            self._produce_state(inputs)
            for p, o in last.items():
                self.producer.produce(self.changelog, key=position_key(p), value=encode_offset(o), partition=p,
                                      on_delivery=self.delivered)
            self._await_deliveries()
        end = time.perf_counter()
        self.first_ms.append((middle - began) * 1000)
        self.second_ms.append((end - middle) * 1000)
        return (end - began) * 1000

    def warm_up(self) -> None:
        for _ in range(WARMUP_BATCHES):
            self.batch()
        self.downstream.wait_for(self.produced)
        self.downstream.latencies_ms.clear()
        self.state_records = self.output_bytes = self.events_done = 0
        self.first_ms.clear()
        self.second_ms.clear()
        self.produced_before = self.produced

    def run(self, seconds: float, max_batches: int) -> None:
        """Back-to-back batches for `seconds` or `max_batches`, whichever ends first; then drain downstream."""
        began = time.perf_counter()
        for _ in range(max_batches):
            if time.perf_counter() - began >= seconds:
                break
            self.commit_ms.append(self.batch())
            self.batches += 1
        self.loop_s += time.perf_counter() - began
        self.downstream.wait_for(self.produced)

    def result(self) -> dict[str, Any]:
        vis = self.downstream.latencies_ms
        n = self.batches or 1
        return {
            "batches": self.batches, "seconds": round(self.loop_s, 2),
            "batches_per_s": round(self.batches / self.loop_s, 1) if self.loop_s else None,
            "events_per_s": round(self.events_done / self.loop_s) if self.loop_s else None,
            "commit_p50_ms": round(quantile(self.commit_ms, 0.5), 1),
            "commit_p99_ms": round(quantile(self.commit_ms, 0.99), 1),
            "steps_p50_ms": [round(quantile(self.first_ms, 0.5), 1), round(quantile(self.second_ms, 0.5), 1)],
            "visible_p50_ms": round(quantile(vis, 0.5), 1), "visible_p99_ms": round(quantile(vis, 0.99), 1),
            "visible_samples": len(vis),
            "output_messages_per_batch": round((self.produced - self.produced_before) / n, 2),
            "output_kib_per_batch": round(self.output_bytes / n / 1024, 1),
            "state_records_per_batch": round(self.state_records / n, 2),
            **({"init_transactions_s": round(self.init_s, 2)} if self.transactional else {}),
        }

    def close(self) -> None:
        self.downstream.close()
        self.consumer.close()
        self.producer.flush(TIMEOUT_S)


def measure_size(bootstrap: str, events: int, seconds: float, max_batches: int) -> dict[str, Any]:
    """Every protocol at one batch size, each for two half-runs in the order ORDER (first to last, then back)."""
    tag = f"{events}-{uuid.uuid4().hex[:6]}"
    input_topic = f"bench-eos-{tag}-in"
    _create_topics(bootstrap, {input_topic: {}})
    per_batch = [min(SDK_MESSAGE_EVENTS, events - i) for i in range(0, events, SDK_MESSAGE_EVENTS)]
    # Each group reads the same input from its beginning (round-robin over the partitions): enough for its batches.
    _prefill(bootstrap, input_topic, per_batch * (max_batches + WARMUP_BATCHES))
    runners: dict[str, Runner] = {}
    try:
        for name, extra in PROTOCOLS.items():
            runners[name] = Runner(name, bootstrap, input_topic, events, tag, dict(extra))
            runners[name].warm_up()
        for name in ORDER:
            runners[name].run(seconds / 2, max_batches // 2)
        out: dict[str, Any] = {"events_per_batch": events, "input_messages_per_batch": len(per_batch)}
        out.update({name: r.result() for name, r in runners.items()})
        return out
    finally:
        for r in runners.values():
            r.close()


def measure(bootstrap: str, sizes: list[int], seconds: float, max_batches: int) -> dict[str, Any]:
    """Every batch size; per size, per protocol, about `seconds` of back-to-back batches (at most max_batches)."""
    return {str(n): measure_size(bootstrap, n, seconds, max_batches) for n in sizes}


def _ratio(num: Any, den: Any) -> str:
    ok = all(isinstance(v, int | float) and not math.isnan(v) for v in (num, den)) and den
    return f"{num / den:.2f}×" if ok else "—"


def _fmt(value: Any, unit: str) -> str:
    return "—" if value is None else f"{value:,}{unit}"


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for the bench's summary table: each protocol's figure, and the ratio of each to the current one's."""
    out = [("7 eos: figures of " + " / ".join(PROTOCOLS), "", "")]
    for n, res in result.items():
        if not isinstance(res, dict) or "current" not in res:
            continue
        for key, label, unit in (("batches_per_s", "batches/s", ""), ("events_per_s", "events/s", ""),
                                 ("commit_p50_ms", "commit p50", " ms"), ("commit_p99_ms", "commit p99", " ms"),
                                 ("visible_p50_ms", "visible p50", " ms"), ("visible_p99_ms", "visible p99", " ms")):
            values = [res[p].get(key) for p in PROTOCOLS]
            out.append((f"7 eos {int(n):,} ev/batch {label}", " / ".join(_fmt(v, unit) for v in values),
                        ", ".join(_ratio(v, values[0]) for v in values[1:]) + " of current"))
    return out


def render(result: dict[str, Any]) -> str:
    """The eos figures as a table: one row per batch size and protocol."""
    head = ("events/batch", "protocol", "batches/s", "events/s", "commit p50/p99 ms", "visible p50/p99 ms",
            "batches", "steps p50 ms")
    table = [head]
    for n, res in result.items():
        if not isinstance(res, dict) or "current" not in res:
            continue
        for p in PROTOCOLS:
            r = res[p]
            table.append((f"{int(n):,}", p, _fmt(r.get("batches_per_s"), ""), _fmt(r.get("events_per_s"), ""),
                          f"{r.get('commit_p50_ms')} / {r.get('commit_p99_ms')}",
                          f"{r.get('visible_p50_ms')} / {r.get('visible_p99_ms')}", str(r.get("batches")),
                          " + ".join(str(v) for v in r.get("steps_p50_ms") or [])))
    width = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, width, strict=True)) for row in table)
