"""`make bench`: per-stage cost, Kafka/Faust baselines, end-to-end throughput and latency, worker RSS.

Starts its own Kafka broker on free loopback ports in a temporary directory (always stopped at the end), prints
each figure as it is measured, then a table and one machine-readable line `BENCH_JSON {...}`. Targets are printed,
not asserted. `python -m tests.bench.run --help` lists the sizes; the defaults take about eight minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import atexit
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

from ops.kafka_local import LocalKafka, ensure_topics
from tally.config import Settings
from tally.errors import KafkaLocalError
from tests.bench import admission, baselines, eos, otlp, pipeline, profile, stages
from tests.bench.common import EventPool, publish_batches, publish_singles
from tests.conftest import free_ports

TARGET_BATCH_RATE = 50_000
TARGET_SINGLE_RATIO = 0.8
TARGET_TWO_WORKERS = 1.7  # two process workers against one, the sink in a process of its own
TARGET_STATE_RSS_MIB = 1024  # a worker with 1,000,000 open logical requests and 10,000 features' detectors


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--pool", type=int, default=50_000, help="distinct generated events (copies get new ids)")
    p.add_argument("--stage-events", type=int, default=50_000, help="events for the in-process stage timing")
    p.add_argument("--baseline-events", type=int, default=600_000, help="events on the batch baseline topic")
    p.add_argument("--single-events", type=int, default=100_000, help="events on one-event-message topics")
    p.add_argument("--pipeline-events", type=int, default=300_000, help="events per batch-message pipeline run")
    p.add_argument("--pipeline-timeout", type=float, default=60.0,
                   help="seconds allowed per pipeline run (rates are then measured over what landed)")
    p.add_argument("--alt-sink-batch-messages", type=int, default=40, metavar="N",
                   help="also run batch messages, role all, with sink_batch_messages=N (0 = skip)")
    p.add_argument("--alt-handoff", default="json", choices=("json", "arrow", ""),
                   help="also run batch messages, role all and process+sink, with this handoff_format ('' = skip)")
    p.add_argument("--latency-rate", type=float, default=10_000.0)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--latency-low-rate", type=float, default=2_000.0,
                   help="also measure latency at this rate for --latency-low-seconds (0 = skip)")
    p.add_argument("--latency-low-seconds", type=float, default=15.0)
    p.add_argument("--sample-every", type=int, default=200)
    p.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                   help="py-spy the worker(s) for this long in each pipeline run")
    p.add_argument("--profile-default-stack", type=int, default=20, metavar="SECONDS",
                   help="py-spy the default stack's workers (process and sink) for this long in the split runs (one "
                        "and two process workers alike, so their ratio stays fair), so the report says where the "
                        "time goes (0 = not); --profile, when set, wins")
    p.add_argument("--state-open-requests", type=int, default=1_000_000,
                   help="stages: open logical requests in the worker-state memory measurement")
    p.add_argument("--state-features", type=int, default=10_000,
                   help="stages: features' detectors in the worker-state memory measurement")
    p.add_argument("--eos-sizes", default="1,100,1000,10000",
                   help="eos: input events per batch, comma-separated (one run of both protocols per size)")
    p.add_argument("--eos-seconds", type=float, default=6.0,
                   help="eos: seconds of back-to-back batches per protocol per size")
    p.add_argument("--eos-max-batches", type=int, default=1500, help="eos: at most this many batches per protocol "
                   "per size")
    p.add_argument("--only", default="stages,baselines,pipeline,split,latency",
                   help="comma-separated subset of: stages,baselines,pipeline,split,latency,eos,otlp (eos: the "
                        "process role's commit protocol, tally's positions vs Kafka transactions; otlp: the OTLP "
                        "input's stage and its pipeline beside the NDJSON one, which split also runs; neither is "
                        "in the default beyond what stages and split run)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, profiles)")
    return p.parse_args(argv)


def _load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "loadavg_15m": round(fifteen, 2),
            "cpus": os.cpu_count()}


def _step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a failure is recorded and reported, and the next measurement still runs."""
    print(f"\n== {name} (load {os.getloadavg()[0]:.2f})", flush=True)
    began = time.monotonic()
    try:
        value = fn()
    except Exception as exc:
        traceback.print_exc()
        value = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    shown = {k: v for k, v in value.items() if k != "profile"} if isinstance(value, dict) else value
    print(f"   {orjson.dumps(shown, option=orjson.OPT_NON_STR_KEYS).decode()}  [{time.monotonic() - began:.1f}s]",
          flush=True)
    if isinstance(value, dict) and "profile" in value:
        for role, summary in value["profile"].items():
            print(f"   py-spy, {role} worker:\n{profile.render(summary)}", flush=True)
    results[name] = value
    return value


def _state_memory(open_requests: int, features: int) -> dict[str, Any]:
    """tests.bench.state_memory in a process of its own, so that nothing else this bench holds is counted."""
    proc = subprocess.run([sys.executable, "-m", "tests.bench.state_memory", "--open-requests", str(open_requests),
                           "--features", str(features)], capture_output=True, timeout=900, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    result: dict[str, Any] = orjson.loads(proc.stdout.splitlines()[-1])
    return result


def _start_kafka(root: Path, partitions: int) -> LocalKafka:
    for attempt in range(2):
        listener, controller = free_ports(2)
        broker = LocalKafka(Settings(data_dir=root / f"broker{attempt}", kafka_bootstrap=f"127.0.0.1:{listener}",
                                     kafka_controller_port=controller, partitions=partitions))
        atexit.register(broker.stop)
        try:
            broker.start(timeout=120.0)
            return broker
        except KafkaLocalError as exc:
            atexit.unregister(broker.stop)
            if attempt or "already in use" not in str(exc):
                raise
    raise AssertionError("unreachable")


def _prepared_topic(base: Settings, label: str, pool: EventPool, events: int, single: bool) -> tuple[str, float]:
    prefix = f"bench-{label}-{uuid.uuid4().hex[:6]}."
    settings = Settings(kafka_bootstrap=base.kafka_bootstrap, topic_prefix=prefix, partitions=base.partitions)
    ensure_topics(settings)
    topic = settings.topics.usage
    if single:
        seconds = publish_singles(base.kafka_bootstrap, topic, pool, 0, events)
    else:
        seconds = publish_batches(base.kafka_bootstrap, topic, pool, 0, events, base.partitions)
    return topic, seconds


def _baselines(results: dict[str, Any], base: Settings, root: Path, pool: EventPool,
               args: argparse.Namespace) -> None:
    bootstrap, parts = base.kafka_bootstrap, base.partitions
    batch_topic, batch_pub = _prepared_topic(base, "base-batch", pool, args.baseline_events, single=False)
    print(f"   prepared {args.baseline_events:,} events as SDK batch messages in {batch_pub:.1f}s", flush=True)
    _step(results, "raw_aiokafka_batch",
          lambda: baselines.raw_consume(bootstrap, batch_topic, parts, args.baseline_events))
    _step(results, "bare_faust_batch",
          lambda: baselines.bare_faust(bootstrap, batch_topic, parts, args.baseline_events, root / "bare"))
    single_topic, single_pub = _prepared_topic(base, "base-single", pool, args.single_events, single=True)
    print(f"   prepared {args.single_events:,} one-event messages in {single_pub:.1f}s", flush=True)
    _step(results, "raw_aiokafka_single",
          lambda: baselines.raw_consume(bootstrap, single_topic, parts, args.single_events))
    _step(results, "bare_faust_single",
          lambda: baselines.bare_faust(bootstrap, single_topic, parts, args.single_events, root / "bare"))


def _get(results: dict[str, Any], name: str, key: str) -> Any:
    value = results.get(name)
    return value.get(key) if isinstance(value, dict) else None


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _ratio(num: Any, den: Any) -> str:
    return f"{num / den:.2f}×" if isinstance(num, int | float) and isinstance(den, int | float) and den else "—"


def _latency_rows(lat: dict[str, Any]) -> list[tuple[str, str, str]]:
    if not lat:
        return []
    if "error" in lat:
        return [("5 latency", "—", "ERROR: " + str(lat["error"])[:80])]
    p50 = ("≥ " if lat.get("p50_lower_bound") else "") + _fmt(lat.get("p50_ms"), " ms")
    p99 = ("≥ " if lat.get("p99_lower_bound") else "") + _fmt(lat.get("p99_ms"), " ms")
    return [
        (f"5 event→queryable p50 @ {_fmt(lat.get('target_rate'))}/s", p50,
         f"{lat.get('layout', 'role all')}; published at {_fmt(lat.get('publish_rate'))} ev/s; "
         f"{lat.get('seen')}/{lat.get('samples')} samples seen"),
        (f"5 event→queryable p99 @ {_fmt(lat.get('target_rate'))}/s", p99,
         f"max {_fmt(lat.get('max_ms'), ' ms')}; {_fmt(lat.get('rows_landed'))} of {_fmt(lat.get('events'))} rows "
         f"in {_fmt(lat.get('window_s'), ' s')}"),
        (f"5 minute rollup as fresh @ {_fmt(lat.get('target_rate'))}/s",
         f"{_fmt(lat.get('rollup_equal_polls'))}/{_fmt(lat.get('rollup_polls'))}",
         "polls where sum(attempts) of rollup_minute = count() of usage_events (same insert, same freshness)"),
    ]


def _table(results: dict[str, Any]) -> str:
    raw = _get(results, "raw_aiokafka_batch", "events_per_s")
    raw_single = _get(results, "raw_aiokafka_single", "events_per_s")
    bare_single = _get(results, "bare_faust_single", "events_per_s")
    rows: list[tuple[str, str, str]] = []
    st = results.get("stages") or {}
    if st and "error" not in st:
        rows += [
            ("1 validate (in process)", _fmt(st.get("validate_us"), " µs/event"), ""),
            ("1 enrich + price", _fmt(st.get("enrich_price_us"), " µs/event"), ""),
            ("1 encode attempt rows", _fmt(st.get("encode_us"), " µs/event"), ""),
            ("1 process_messages (all three)", _fmt(st.get("process_messages_us"), " µs/event"),
             f"= {_fmt(st.get('process_messages_events_per_s'))} events/s on one core"),
            ("1 fold (alone)", _fmt(st.get("fold_us"), " µs/event"),
             f"{_fmt(st.get('fold_logical_requests'))} requests, {_fmt(st.get('fold_multi_attempt_share'))} "
             f"multi-attempt, {_fmt(st.get('fold_state_writes_per_event'))} state writes/event"),
            ("1 process_messages + fold", _fmt(st.get("process_with_fold_us"), " µs/event"),
             f"= {_fmt(st.get('process_with_fold_events_per_s'))} events/s on one core"),
            ("1 the same, as the process role runs it (Arrow hand-off)", _fmt(st.get("process_arrow_us"), " µs/event"),
             f"= {_fmt(st.get('process_arrow_events_per_s'))} events/s on one core"),
            ("1 detect (decode + observe its requests)", _fmt(st.get("detect_us"), " µs/event"),
             f"{_fmt(st.get('detect_us_per_request'))} µs per logical request"),
        ]
    fm = results.get("fold_memory") or {}
    if fm and "error" not in fm:
        rows.append((f"6 fold state, {_fmt(fm.get('in_flight'))} open requests (traced)",
                     _fmt(fm.get("state_mib"), " MiB"),
                     f"{_fmt(fm.get('state_bytes_per_request'))} B/request (value "
                     f"{_fmt(fm.get('value_bytes_per_request'))} B); "
                     f"fold {_fmt(fm.get('fold_open_us'))} µs/open request"))
    sm = results.get("state_memory") or {}
    if sm and "error" not in sm:
        peak = sm.get("rss_peak_mib") or 0
        rows.append((f"6 worker state RSS, {_fmt(sm.get('open_requests'))} open requests + "
                     f"{_fmt(sm.get('features'))} features' detectors", _fmt(peak, " MiB"),
                     f"target ≤ {TARGET_STATE_RSS_MIB:,}: {'MET' if peak <= TARGET_STATE_RSS_MIB else 'MISSED'}; "
                     f"imports {_fmt(sm.get('rss_base_mib'))}, + fold state → {_fmt(sm.get('rss_with_fold_mib'))}, "
                     f"+ detectors → {_fmt(sm.get('rss_with_detectors_mib'))} MiB (no Faust)"))
    ad = results.get("admission") or {}
    if ad and "error" not in ad:
        p99 = ad.get("reserve_p99_us") or 0
        rows.append(("1 gateway admission: reserve(), published through KafkaDecisions, p50 / p99",
                     f"{_fmt(ad.get('reserve_p50_us'))} / {_fmt(p99)} µs",
                     f"target p99 < {ad.get('target_p99_us')} µs: "
                     f"{'MET' if p99 < (ad.get('target_p99_us') or 0) else 'MISSED'} ({_fmt(ad.get('calls'))} calls)"))
        if ad.get("kept_p99_us") is not None:
            rows.append(("1 reserve() p50 / p99: records kept as dicts; all denied",
                         f"{_fmt(ad.get('kept_p50_us'))} / {_fmt(ad.get('kept_p99_us'))}; "
                         f"{_fmt(ad.get('deny_p50_us'))} / {_fmt(ad.get('deny_p99_us'))} µs",
                         "tests/bench/admission.py's scenarios"))
    ot = results.get("otlp_stage") or {}
    if ot and "error" not in ot:
        rows.append(("1 otlp stage: spans → events, otlp_proto / otlp_json",
                     f"{_fmt(ot.get('otlp_proto_us'))} / {_fmt(ot.get('otlp_json_us'))} µs/span",
                     f"decode + map + route, 500-span messages of {_fmt(ot.get('otlp_proto_bytes_per_span'))} / "
                     f"{_fmt(ot.get('otlp_json_bytes_per_span'))} B a span; then the NDJSON path's process step"))
    sk = results.get("sink_stages") or {}
    if sk and "error" not in sk:
        lookups = sk.get("lookup_s_by_ids") or {}
        rows += [
            ("1 sink decode, row path (dicts)", _fmt(sk.get("decode_us"), " µs/row"),
             f"attempt lines {_fmt(sk.get('attempt_line_bytes'))} B"),
            (f"1 sink write, row path ({_fmt(sk.get('write_batch_rows'))}-row batches)",
             _fmt(sk.get("write_us"), " µs/row"), "plan + dicts to Arrow + insert (chDB)"),
            ("1 sink decode, columnar (Arrow)", _fmt(sk.get("columnar_decode_us"), " µs/row"),
             f"{_ratio(sk.get('columnar_decode_us'), sk.get('decode_us'))} of the row path; fast path took "
             f"{_fmt(sk.get('columnar_fast_share'))} of messages"),
            ("1 sink write, columnar", _fmt(sk.get("columnar_write_us"), " µs/row"),
             f"{_ratio(sk.get('columnar_write_us'), sk.get('write_us'))} of the row path; plan + insert_arrow"),
            ("1 process: encode an attempt, NDJSON / Arrow", f"{_fmt(sk.get('encode_json_us'))} / "
             f"{_fmt(sk.get('encode_arrow_us'))} µs/row", "encode_row vs encode_attempt_rows (the hand-off)"),
            ("1 sink decode, Arrow hand-off", _fmt(sk.get("arrow_decode_us"), " µs/row"),
             f"{_ratio(sk.get('arrow_decode_us'), sk.get('decode_us'))} of the row path; "
             f"{_fmt(sk.get('arrow_rows_per_message'))} rows, {_fmt(sk.get('arrow_bytes_per_row'))} B/row a message"),
            ("1 sink write, Arrow hand-off", _fmt(sk.get("arrow_write_us"), " µs/row"),
             f"{_ratio(sk.get('arrow_write_us'), sk.get('write_us'))} of the row path; same rows landed: "
             f"{sk.get('arrow_rows_equal')}"),
            ("1 sink decoders, same messages", ", ".join(f"{k} {v}" for k, v in
                                                         (sk.get("decoders_us") or {}).items()), "µs/row"),
            ("1 sink decode + write a logical-request row",
             f"{_fmt(sk.get('request_decode_us'))} + {_fmt(sk.get('request_write_us'))} µs/row",
             f"request lines {_fmt(sk.get('request_line_bytes'))} B"),
            ("1 sink decode + write a logical-request row, Arrow hand-off",
             f"{_fmt(sk.get('arrow_request_decode_us'))} + {_fmt(sk.get('arrow_request_write_us'))} µs/row",
             f"{_ratio(sk.get('arrow_request_write_us'), sk.get('request_write_us'))} of the NDJSON write; "
             f"{_fmt(sk.get('arrow_request_messages'))} messages"),
            (f"1 sink lookup vs {_fmt(sk.get('rows'))} saved rows", ", ".join(f"{k} ids {v} s" for k, v in
                                                                         lookups.items()), "one call each"),
        ]
    rows += [
        ("2 raw aiokafka + orjson, batch msgs", _fmt(raw, " ev/s"), "1.00× (the reference)"),
        ("2 raw aiokafka + orjson, 1-event msgs", _fmt(raw_single, " ev/s"), _ratio(raw_single, raw)),
        ("3 bare Faust agent, batch msgs", _fmt(_get(results, "bare_faust_batch", "events_per_s"), " ev/s"),
         _ratio(_get(results, "bare_faust_batch", "events_per_s"), raw)),
        ("3 bare Faust agent, 1-event msgs", _fmt(bare_single, " ev/s"), _ratio(bare_single, raw)),
    ]
    alt = _get(results, "pipeline_batch_all_alt", "overrides") or {}
    alt_label = "4 pipeline batch msgs, role all, " + ",".join(f"{k}={v}" for k, v in alt.items())
    handoff = f"handoff_format={(results.get('args') or {}).get('alt_handoff')}"
    for name, label in (("pipeline_batch_all", "4 pipeline batch msgs, role all"),
                        ("pipeline_batch_all_alt", alt_label),
                        ("pipeline_batch_all_handoff", f"4 pipeline batch msgs, role all, {handoff}"),
                        ("pipeline_single_all", "4 pipeline 1-event msgs, role all"),
                        ("pipeline_single_all_handoff", f"4 pipeline 1-event msgs, role all, {handoff}"),
                        ("pipeline_batch_split", "4 pipeline batch msgs, process+sink"),
                        ("pipeline_otlp_split", "4 pipeline OTLP spans (otlp_proto), process+sink"),
                        ("pipeline_batch_split2", "4 pipeline batch msgs, 2 process + sink"),
                        ("pipeline_batch_split_handoff", f"4 pipeline batch msgs, process+sink, {handoff}")):
        steady = _get(results, name, "rate_steady")
        total = _get(results, name, "rate_total")
        note = _ratio(steady, raw) + " of raw"
        if name not in results:
            continue
        if name.startswith("pipeline_batch_all") and isinstance(steady, int):
            note += f"; target ≥ {TARGET_BATCH_RATE:,}: {'MET' if steady >= TARGET_BATCH_RATE else 'MISSED'}"
        if name == "pipeline_single_all" and isinstance(steady, int) and isinstance(bare_single, int):
            want = TARGET_SINGLE_RATIO * bare_single
            note += (f"; {steady / bare_single:.2f}× bare Faust 1-event, target ≥ {TARGET_SINGLE_RATIO}: "
                     f"{'MET' if steady >= want else 'MISSED'}")
        one = _get(results, "pipeline_batch_split", "rate_steady")
        if name == "pipeline_otlp_split" and isinstance(steady, int) and isinstance(one, int) and one:
            note += f"; {steady / one:.2f}× the same events as SDK batch messages (NDJSON)"
        if name == "pipeline_batch_split2" and isinstance(steady, int) and isinstance(one, int) and one:
            note += (f"; {steady / one:.2f}× one process worker, target ≥ {TARGET_TWO_WORKERS}: "
                     f"{'MET' if steady >= TARGET_TWO_WORKERS * one else 'MISSED'} "
                     f"({os.cpu_count()} cores for 3 processes)")
        if _get(results, name, "error"):
            note = "ERROR: " + str(_get(results, name, "error"))[:80]
        elif _get(results, name, "complete") is False:
            note += f"; INCOMPLETE ({_fmt(_get(results, name, 'rows'))} rows)"
        rows.append((label + " (steady)", _fmt(steady, " ev/s"), note))
        rows.append((label + " (incl. startup)", _fmt(total, " ev/s"),
                     f"startup→first rows {_fmt(_get(results, name, 'first_rows_s'), ' s')}"))
    for name in ("latency", "latency_low"):
        rows += _latency_rows(results.get(name) or {})
    if isinstance(results.get("eos"), dict):
        rows += eos.rows(results["eos"]) if "error" not in results["eos"] else [
            ("7 eos", "—", "ERROR: " + str(results["eos"]["error"])[:80])]
    for name in ("pipeline_batch_all", "pipeline_batch_all_alt", "pipeline_single_all", "pipeline_batch_split",
                 "pipeline_otlp_split", "pipeline_batch_split2", "latency", "latency_low"):
        rss = _get(results, name, "peak_rss_mib")
        if isinstance(rss, dict):
            rows.append((f"6 peak RSS (VmHWM), {name}", ", ".join(f"{r} {_fmt(v, ' MiB')}" for r, v in rss.items()),
                         ""))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+".join("-" * (w + 2) for w in width)
    out = [line, " | ".join(h.ljust(w) for h, w in zip(("measurement", "figure", "ratio / target"), width,
                                                          strict=True)), line]
    out += [" | ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) for r in rows]
    return "\n".join([*out, line])


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    only = set(args.only.split(","))
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    results: dict[str, Any] = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "host": {"python": platform.python_version(), **_load()}, "args": vars(args)}
    began = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="tally-bench-")
    root = Path(tmp)
    print(f"tally bench: temp dir {root}; load {results['host']}", flush=True)
    broker: LocalKafka | None = None
    try:
        if only - {"eos"}:  # the eos section writes synthetic lines: no generated events
            pool = EventPool(args.pool, args.partitions)
            print(f"   event pool: {len(pool):,} generated events", flush=True)
        if "stages" in only:
            _step(results, "stages", lambda: stages.measure_stages(pool, args.stage_events, args.partitions))
            _step(results, "sink_stages", lambda: stages.measure_sink(pool, args.stage_events, args.partitions))
            _step(results, "fold_memory", lambda: stages.measure_fold_memory(pool))
            _step(results, "state_memory", lambda: _state_memory(args.state_open_requests, args.state_features))
            _step(results, "admission", admission.measure_reserve)
            _step(results, "otlp_stage", lambda: otlp.measure_translate(pool, args.stage_events, args.partitions))
        if only - {"stages"}:
            broker = _start_kafka(root, args.partitions)
            print(f"   Kafka at {broker.bootstrap}", flush=True)
            base = Settings(data_dir=root, kafka_bootstrap=broker.bootstrap,
                            kafka_controller_port=broker.controller_port, partitions=args.partitions)
            if "baselines" in only:
                _baselines(results, base, root, pool, args)
            timeout = args.pipeline_timeout
            if "pipeline" in only:
                _step(results, "pipeline_batch_all", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=False, timeout_s=timeout,
                    profile_s=args.profile))
                if args.alt_sink_batch_messages:
                    _step(results, "pipeline_batch_all_alt", lambda: pipeline.throughput(
                        base, root, pool, args.pipeline_events, single=False, split=False, timeout_s=timeout,
                        profile_s=args.profile, sink_batch_messages=args.alt_sink_batch_messages))
                if args.alt_handoff:
                    _step(results, "pipeline_batch_all_handoff", lambda: pipeline.throughput(
                        base, root, pool, args.pipeline_events, single=False, split=False, timeout_s=timeout,
                        profile_s=args.profile, handoff_format=args.alt_handoff))
                _step(results, "pipeline_single_all", lambda: pipeline.throughput(
                    base, root, pool, args.single_events, single=True, split=False, timeout_s=timeout,
                    profile_s=args.profile))
                if args.alt_handoff:
                    _step(results, "pipeline_single_all_handoff", lambda: pipeline.throughput(
                        base, root, pool, args.single_events, single=True, split=False, timeout_s=timeout,
                        profile_s=args.profile, handoff_format=args.alt_handoff))
            if "split" in only:
                _step(results, "pipeline_batch_split", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                    profile_s=args.profile or args.profile_default_stack))
                _step(results, "pipeline_batch_split2", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                    profile_s=args.profile or args.profile_default_stack, process_workers=2))
                _step(results, "pipeline_otlp_split", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                    profile_s=args.profile or args.profile_default_stack, otlp=True,
                    otlp_logical_request="parent"))  # the spans' parents are the pool's logical requests
                if args.alt_handoff:
                    _step(results, "pipeline_batch_split_handoff", lambda: pipeline.throughput(
                        base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                        profile_s=args.profile, handoff_format=args.alt_handoff))
            if "otlp" in only and "split" not in only:  # the OTLP path beside the NDJSON one, on the default stack
                if "stages" not in only:
                    _step(results, "otlp_stage",
                          lambda: otlp.measure_translate(pool, args.stage_events, args.partitions))
                _step(results, "pipeline_batch_split", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                    profile_s=args.profile or args.profile_default_stack))
                _step(results, "pipeline_otlp_split", lambda: pipeline.throughput(
                    base, root, pool, args.pipeline_events, single=False, split=True, timeout_s=timeout,
                    profile_s=args.profile or args.profile_default_stack, otlp=True,
                    otlp_logical_request="parent"))  # the spans' parents are the pool's logical requests
            if "latency" in only:
                _step(results, "latency", lambda: pipeline.latency(
                    base, root, pool, args.latency_rate, args.latency_seconds, args.sample_every, first_event=0))
                if args.latency_low_rate:
                    _step(results, "latency_low", lambda: pipeline.latency(
                        base, root, pool, args.latency_low_rate, args.latency_low_seconds,
                        max(1, args.sample_every // 5), first_event=0))
            if "eos" in only:
                sizes = [int(n) for n in args.eos_sizes.split(",")]
                value = _step(results, "eos", lambda: eos.measure(base.kafka_bootstrap, sizes, args.eos_seconds,
                                                                  args.eos_max_batches))
                if "error" not in value:
                    print(eos.render(value), flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr, flush=True)
        results["interrupted"] = True
    finally:
        if broker is not None:
            broker.stop()
            atexit.unregister(broker.stop)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results["host_end"] = _load()
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    print("\n" + _table(results))
    print(f"load at start {results['host']['loadavg_1m']}, at end {results['host_end']['loadavg_1m']} "
          f"({results['host']['cpus']} CPUs); whole bench {results['elapsed_s']}s"
          + (f"; kept {root}" if args.keep else ""))
    print("BENCH_JSON " + orjson.dumps(results, option=orjson.OPT_NON_STR_KEYS).decode(), flush=True)
    return 130 if results.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
