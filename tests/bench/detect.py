"""`make bench-detect`: precision, recall and delay of the detectors on a labelled stream, against the seed's z-score.

The stream is the simulator's (ops/simulate.py) over several days of event time: daily seasonality, steady growth,
huge one-off requests (benign), and two injected incidents of every kind (labelled). It runs through the real
validate → enrich → fold code (no Kafka) and the resulting logical requests feed streams.detect.Detector and the
seed's detector (per feature, the last 100 request costs, z > 2). An alert is a true positive when it names the
incident's feature and is raised between the incident's start and `--tolerance-min` after its end. The seed's
detector alerts per request; its alerts are grouped into pages (a new page when the feature had no alert in the
previous 30 minutes) so that both are compared as pages. Figures are printed, not asserted.

`--mode backfill|paced|all` also publishes the same streams through the SDK into a real stack of their own and scores
what lands in tally.anomalies (tests/bench/detect_stack.py), side by side with offline: `make bench-detect-stack`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from ops.simulate import INCIDENT_KINDS, Incident, Profile, TrafficGenerator, catalog_from_reference
from streams.detect import DetectConfig, Detector
from streams.fold import FoldConfig, Folder, apply_writes
from streams.pipeline import FoldStep, process_messages
from streams.records import Source
from streams.validate import Validator
from streams.watermarks import InputProgress
from tally.reference import snapshot_of
from tally.sdk.batching import pack_ndjson, partition_of_line
from tests.bench.common import reference_docs
from tests.bench.detect_stack import SdkOptions, compare_pages, run_stack, speedup_for, stream_lines

PARTITIONS = 4
STREAM_START = datetime(2026, 11, 1, tzinfo=UTC)  # fixed: the same seed gives the same stream (and cache) every day
SEED_PAGE_GAP = timedelta(minutes=30)
DETECT = DetectConfig()  # every mode's detectors: offline directly, through the stack via TALLY_DETECT_* settings


@dataclass
class Outcome:
    """Pages raised by one detector: (feature_id, detected_at, signal)."""

    pages: list[tuple[str, datetime, str]] = field(default_factory=list)


@dataclass
class ZScoreBaseline:
    """The seed's detector, the one to beat: per feature, the last 100 request costs, alert when z > 2."""

    window: int = 100
    threshold: float = 2.0
    recent: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, feature_id: str, cost: float) -> bool:
        """True when this request's cost is anomalous against the feature's last `window` costs."""
        values = self.recent.setdefault(feature_id, [])
        values.append(cost)
        if len(values) > self.window:
            del values[0]
        if len(values) < 10:
            return False
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return std > 0 and abs(cost - mean) / std > self.threshold


def scenario(start: datetime, days: float, seed: int) -> tuple[Profile, list[Incident]]:
    """Two incidents of each kind on distinct features after the first day, and six one-off huge requests."""
    docs = reference_docs()
    features = [f[0] for f in catalog_from_reference(docs).features]
    incidents: list[Incident] = []
    first = start + timedelta(hours=30)
    span = (days * 24 - 34) / (2 * len(INCIDENT_KINDS))
    for i in range(2 * len(INCIDENT_KINDS)):
        kind = INCIDENT_KINDS[i % len(INCIDENT_KINDS)]
        at = first + timedelta(hours=span * i)
        feature = features[(i * 7 + seed) % len(features)]
        incidents.append(Incident(kind, feature, at, at + timedelta(minutes=60), tenant="tenant-031"))
    one_offs = tuple((start + timedelta(hours=20 + 9 * k), features[(k * 5 + 3) % len(features)]) for k in range(6))
    return Profile(seasonality=0.5, growth_per_day=0.15, incidents=tuple(incidents), one_offs=one_offs), incidents


# What the detectors read from one requests partition: decoded request rows, or a watermark message's marks.
Item = tuple[int, list[Any], dict[int, int] | None]


# Lines per process batch: about two minutes of event time at the default rate, like a caught-up worker's batches.
CHUNK = 500


def logical_requests(gen: TrafficGenerator, until: datetime, chunk: int = CHUNK) -> Iterator[Item]:
    """The generator's traffic through validate → enrich → fold, as the requests topic carries it.

    Per chunk: (requests partition, decoded rows, None) for its requests, then (requests partition, [], marks) for
    each requests partition: the input partitions' watermarks after the chunk (streams.watermarks, rule 1).
    """
    validator = Validator()
    refs = snapshot_of(reference_docs())
    config = FoldConfig()
    folder = Folder(config, PARTITIONS)
    progress = InputProgress(settle_ms=config.settle_ms, idle_s=config.idle_s)
    state: dict[bytes, bytes] = {}
    step = FoldStep(folder, state, PARTITIONS)
    offset = 0
    while gen.clock < until:
        lines: list[bytes] = []
        while len(lines) < chunk and gen.clock < until:
            lines.extend(orjson.dumps(e) for e in gen.logical_request())
        by_partition: dict[int, list[bytes]] = defaultdict(list)
        for line in lines:
            by_partition[partition_of_line(line, PARTITIONS)].append(line)
        batch = []
        for p, group in by_partition.items():
            for value in pack_ndjson(group, 900 * 1024):
                batch.append((value, Source("llm.usage.v1", p, offset)))
                offset += 1
        out = process_messages(batch, validator, refs, PARTITIONS, datetime.now(UTC), step, time.time())
        apply_writes(state, out.fold_writes)
        for p, encoded in out.requests.items():
            yield p, [orjson.loads(b) for b in encoded], None
        if progress.after_batch(by_partition, {p: c.now_ms for p, c in folder.clocks.items()}, time.time()):
            for p in range(PARTITIONS):
                yield p, [], dict(progress.marks)


_KEEP = ("revision", "sign", "feature_id", "team_id", "tenant_id", "endpoint", "deploy_version", "final_model",
         "last_ts", "cost_total_usd", "input_tokens", "cache_read_tokens", "cache_write_tokens",
         "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "retries", "fallbacks")


def cached_requests(gen: TrafficGenerator, until: datetime, cache: Path | None) -> Iterator[Item]:
    """logical_requests(), trimmed to what the detectors read; replayed from `cache` when that file exists."""
    if cache is not None and cache.exists():
        with cache.open("rb") as fh:
            for line in fh:
                p, rows, marks = orjson.loads(line)
                yield p, rows, {int(k): v for k, v in marks.items()} if marks is not None else None
        return
    out = cache.open("wb") if cache is not None else None
    try:
        for p, rows, marks in logical_requests(gen, until):
            trimmed = [{k: r[k] for k in _KEEP} for r in rows]
            if out is not None:
                out.write(orjson.dumps([p, trimmed, {str(k): v for k, v in marks.items()} if marks else None])
                          + b"\n")
            yield p, trimmed, marks
    finally:
        if out is not None:
            out.close()


def quantile(values: list[float], q: float) -> float | None:
    """The inclusive q-quantile (linear between order statistics: never beyond the largest value); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def score(pages: list[tuple[str, datetime, str]], incidents: list[Incident], tolerance: timedelta) -> dict[str, Any]:
    """Precision over pages; recall and median delay per incident kind."""
    def matches(page: tuple[str, datetime, str], inc: Incident) -> bool:
        return page[0] == inc.feature_id and inc.start <= page[1] <= inc.end + tolerance

    true_pages = sum(1 for p in pages if any(matches(p, inc) for inc in incidents))
    per_kind: dict[str, dict[str, Any]] = {}
    for kind in INCIDENT_KINDS:
        found, delays = 0, []
        of_kind = [inc for inc in incidents if inc.kind == kind]
        for inc in of_kind:
            hits = sorted(p[1] for p in pages if matches(p, inc))
            if hits:
                found += 1
                delays.append((hits[0] - inc.start).total_seconds() / 60)
        per_kind[kind] = {"recall": found / len(of_kind), "delay_min": statistics.median(delays) if delays else None,
                          "p90_delay_min": quantile(delays, 0.9), "delays": delays}
    every_delay = [d for v in per_kind.values() for d in v.pop("delays")]
    recalls = [v["recall"] for v in per_kind.values()]
    delays_all = [v["delay_min"] for v in per_kind.values() if v["delay_min"] is not None]
    return {"pages": len(pages), "true_pages": true_pages,
            "precision": true_pages / len(pages) if pages else 0.0,
            "recall": sum(recalls) / len(recalls), "median_delay_min": statistics.median(delays_all)
            if delays_all else None, "median_delay_all_min": statistics.median(every_delay) if every_delay else None,
            "p90_delay_min": statistics.quantiles(every_delay, n=10)[-1] if len(every_delay) > 1 else None,
            "per_kind": per_kind}


def labelled_stream(days: float, rate: float, seed: int) -> tuple[TrafficGenerator, list[Incident], datetime]:
    """One seed's labelled stream: its generator (not yet run), its incidents, and where it ends (event time).

    Every mode generates its stream here, so the same seed, days and rate give the very same events.
    """
    start = STREAM_START
    profile, incidents = scenario(start, days, seed)
    gen = TrafficGenerator(catalog_from_reference(reference_docs()), seed=seed, start=start, rate=rate,
                           bad_rate=0.0, profile=profile)
    return gen, incidents, start + timedelta(days=days)


def detect_stream(days: float, rate: float, seed: int, cache: Path | None
                  ) -> tuple[list[Incident], Outcome, Outcome, int]:
    """One seed's stream through both detectors: its incidents, both detectors' pages, and its request count."""
    gen, incidents, until = labelled_stream(days, rate, seed)
    detector = Detector(DETECT)
    seed_detector = ZScoreBaseline()
    ours, theirs = Outcome(), Outcome()
    last_seed_alert: dict[str, datetime] = {}
    opened: set[str] = set()
    requests = 0
    for partition, rows, marks in cached_requests(gen, until, cache):
        requests += len(rows)
        detector.observe(rows, partition)
        for a in detector.watermark(partition, marks, PARTITIONS) if marks is not None else []:
            if a["state"] == "firing" and a["incident_id"] not in opened:
                opened.add(a["incident_id"])
                ours.pages.append((a["feature_id"], datetime.fromisoformat(a["detected_at"]), a["incident_id"]))
        for row in rows:
            if row["revision"] != 1:
                continue
            if seed_detector.observe(row["feature_id"], float(row["cost_total_usd"])):
                at = datetime.fromisoformat(row["last_ts"])
                previous = last_seed_alert.get(row["feature_id"])
                if previous is None or at - previous > SEED_PAGE_GAP:
                    theirs.pages.append((row["feature_id"], at, "z-score"))
                last_seed_alert[row["feature_id"]] = at
    return incidents, ours, theirs, requests


def run(days: float, rate: float, seeds: list[int], tolerance_min: float, cache: Path | None = None
        ) -> dict[str, Any]:
    """Generate one stream per seed, detect with both detectors, score both over all the streams together.

    Streams are independent: a page only matches an incident of its own stream (features are prefixed by seed).
    """
    incidents: list[Incident] = []
    ours, theirs = Outcome(), Outcome()
    requests = 0
    started = time.monotonic()
    for seed in seeds:
        name = f"{cache.stem}-{seed}-{days:g}d-{rate:g}-wm{CHUNK}{cache.suffix}" if cache else ""
        seed_cache = cache.with_name(name) if cache else None
        found, mine, seeds_own, n = detect_stream(days, rate, seed, seed_cache)
        requests += n
        incidents += [dataclasses.replace(i, feature_id=f"{seed}/{i.feature_id}") for i in found]
        ours.pages += [(f"{seed}/{f}", t, s) for f, t, s in mine.pages]
        theirs.pages += [(f"{seed}/{f}", t, s) for f, t, s in seeds_own.pages]
    seconds = time.monotonic() - started
    tolerance = timedelta(minutes=tolerance_min)
    return {"requests": requests, "seconds": round(seconds, 1), "incidents": len(incidents), "seeds": seeds,
            "tally": score(ours.pages, incidents, tolerance), "zscore": score(theirs.pages, incidents, tolerance),
            **misses(ours.pages, incidents, tolerance), "_pages": ours.pages}


def misses(pages: list[tuple[str, datetime, str]], incidents: list[Incident], tolerance: timedelta
           ) -> dict[str, Any]:
    """The incidents no page matched, and the pages that match no incident."""
    def hit(f: str, t: datetime, i: Incident) -> bool:
        return f == i.feature_id and i.start <= t <= i.end + tolerance
    return {"missed": [f"{i.kind} on {i.feature_id} at {i.start:%d %H:%M}" for i in incidents
                       if not any(hit(f, t, i) for f, t, _ in pages)],
            "false_pages": [(f, t.isoformat(), s) for f, t, s in pages if not any(hit(f, t, i) for i in incidents)]}


def run_stack_modes(modes: list[str], days: float, rate: float, seeds: list[int], tolerance_min: float,
                    sdk: SdkOptions, paced_minutes: float, speedup: float | None, kills: int, root: Path,
                    keep: bool = False) -> dict[str, dict[str, Any]]:
    """The same labelled streams published through the SDK into a fresh stack per mode and seed, scored on anomalies.

    `modes` among backfill, paced and backfill-kill9 (a backfill with the worker killed `kills` times).
    """
    tolerance = timedelta(minutes=tolerance_min)
    pages: dict[str, list[tuple[str, datetime, str]]] = {m: [] for m in modes}
    infos: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    repeated: dict[str, dict[str, int]] = {m: {} for m in modes}
    refired: dict[str, dict[str, int]] = {m: {} for m in modes}
    incidents: list[Incident] = []
    for seed in seeds:
        gen, found, until = labelled_stream(days, rate, seed)
        incidents += [dataclasses.replace(i, feature_id=f"{seed}/{i.feature_id}") for i in found]
        lines = stream_lines(gen, until)
        pace = speedup or speedup_for(lines, paced_minutes)
        for mode in modes:
            started = time.monotonic()
            print(f"seed {seed}, mode {mode}: {len(lines):,} lines" + (f", {pace:.0f}x event time" if mode == "paced"
                                                                       else ""), flush=True)
            res = run_stack("paced" if mode == "paced" else mode, lines, DETECT, root / f"seed{seed}", sdk,
                            speedup=pace, kills=kills if mode == "backfill-kill9" else 0, prefix=f"{seed}/",
                            keep=keep, log=lambda m: print(m, flush=True))
            pages[mode] += res.anomalies.pages
            repeated[mode].update({f"{seed}/{k}": v for k, v in res.anomalies.repeated_rows.items()})
            refired[mode].update({f"{seed}/{k}": v for k, v in res.anomalies.refired.items()})
            infos[mode].append({"seed": seed, "lines": len(lines), "speedup": round(pace, 1) if mode == "paced"
                                else None, "seconds": round(time.monotonic() - started, 1), **res.info})
    return {m: {"tally": score(pages[m], incidents, tolerance), **misses(pages[m], incidents, tolerance),
                "repeated_firing_rows": repeated[m], "refired_incidents": refired[m], "runs": infos[m],
                "_pages": pages[m]} for m in modes}


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def side_by_side(results: dict[str, dict[str, Any]], limit: float = 0.05) -> str:
    """Per incident kind and mode: recall, median and p90 delay (minutes); then precision and recall against offline."""
    modes = list(results)
    head = f"{'incident kind':<18}" + "".join(f" | {m:^22}" for m in modes)
    sub = f"{'':<18}" + "".join(f" | {'recall':>6} {'median':>7} {'p90':>7}" for _ in modes)
    lines = [head, sub, "-" * len(sub)]
    for kind in INCIDENT_KINDS:
        row = f"{kind:<18}"
        for m in modes:
            k = results[m]["tally"]["per_kind"][kind]
            row += f" | {k['recall']:>6.2f} {_fmt(k['delay_min']):>7} {_fmt(k['p90_delay_min']):>7}"
        lines.append(row)
    lines.append("-" * len(sub))
    for label, key in (("pages", "pages"), ("true pages", "true_pages")):
        lines.append(f"{label:<18}" + "".join(f" | {results[m]['tally'][key]:>22}" for m in modes))
    for label, key in (("precision", "precision"), ("recall", "recall")):
        lines.append(f"{label:<18}" + "".join(f" | {results[m]['tally'][key]:>22.3f}" for m in modes))
    lines.append(f"{'median delay (all)':<18}"
                 + "".join(f" | {_fmt(results[m]['tally']['median_delay_all_min']):>22}" for m in modes))
    lines.append(f"{'p90 delay (all)':<18}"
                 + "".join(f" | {_fmt(results[m]['tally']['p90_delay_min']):>22}" for m in modes))
    if "offline" in results:
        base = results["offline"]["tally"]
        for label, key in (("Δ precision", "precision"), ("Δ recall", "recall")):
            lines.append(f"{label:<18}" + "".join(f" | {results[m]['tally'][key] - base[key]:>+22.3f}" for m in modes))
        worst = {m: max(abs(results[m]["tally"]["precision"] - base["precision"]),
                        abs(results[m]["tally"]["recall"] - base["recall"]),
                        *(abs(results[m]["tally"]["per_kind"][k]["recall"] - base["per_kind"][k]["recall"])
                          for k in INCIDENT_KINDS)) for m in modes}
        lines.append(f"{'within ' + format(limit, '.2f'):<18}"
                     + "".join(f" | {('yes' if worst[m] <= limit + 1e-9 else 'NO') + f' (max Δ {worst[m]:.2f})':>22}"
                               for m in modes))
    return "\n".join(lines)


def _table(result: dict[str, Any]) -> str:
    lines = [f"{'incident kind':<20} {'tally recall':>12} {'tally delay':>12} {'z-score recall':>15} "
             f"{'z-score delay':>14}"]
    for kind in INCIDENT_KINDS:
        ours, theirs = result["tally"]["per_kind"][kind], result["zscore"]["per_kind"][kind]

        def delay(v: dict[str, Any]) -> str:
            return "-" if v["delay_min"] is None else f"{v['delay_min']:.1f} min"
        lines.append(f"{kind:<20} {ours['recall']:>12.2f} {delay(ours):>12} {theirs['recall']:>15.2f} "
                     f"{delay(theirs):>14}")
    for name in ("tally", "zscore"):
        r = result[name]
        delay_text = "-" if r["median_delay_min"] is None else f"{r['median_delay_min']:.1f} min"
        every = "-" if r["median_delay_all_min"] is None else f"{r['median_delay_all_min']:.1f} min"
        p90 = "-" if r["p90_delay_min"] is None else f"{r['p90_delay_min']:.1f} min"
        lines.append(f"{name:<8} pages {r['pages']:>6}  true {r['true_pages']:>5}  precision {r['precision']:.3f}  "
                     f"recall {r['recall']:.3f}  median delay {delay_text} (of the kinds' medians; over every "
                     f"detected incident {every}, p90 {p90})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the detection table(s) and a BENCH_DETECT_JSON line."""
    p = argparse.ArgumentParser(prog="python -m tests.bench.detect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=float, default=2.5, help="days of event time per stream")
    p.add_argument("--rate", type=float, default=3.0, help="logical requests per second of event time (mean)")
    p.add_argument("--seeds", default="7,11", help="one stream per seed, scored together")
    p.add_argument("--cache", type=Path, help="keep each stream's logical requests in files named after this one "
                   "(and its seed, days and rate) and replay them next time")
    p.add_argument("--tolerance-min", type=float, default=15.0, help="minutes after an incident an alert still counts")
    p.add_argument("--mode", choices=("offline", "backfill", "paced", "all", "kill"), default="offline",
                   help="offline: the detectors fed directly (default); backfill / paced: the same streams published "
                   "through the SDK into a real stack (at once / at --speedup), scored on tally.anomalies, side by "
                   "side with offline; all: offline, backfill and paced")
    p.add_argument("--kill-process", type=int, default=0, metavar="N",
                   help="with backfill or all: one more backfill during which the worker is killed (SIGKILL) N times, "
                   "its pages compared with the plain backfill's")
    p.add_argument("--speedup", type=float, help="paced: event time runs this many times faster than wall time "
                   "(default: the stream replayed in --paced-minutes)")
    p.add_argument("--paced-minutes", type=float, default=4.0, help="paced: wall minutes per stream (see --speedup)")
    p.add_argument("--sdk-batch-events", type=int, default=500, help="SDK: events per Kafka message at most "
                   "(a message of a quiet stream spans hours of event time when this is large)")
    p.add_argument("--sdk-max-bytes", type=int, default=512 * 1024, help="SDK: bytes per Kafka message at most "
                   "(the pipeline takes up to 1 MiB)")
    p.add_argument("--sdk-buffer-ms", type=int, default=1000, help="SDK: a partly filled message waits this long")
    p.add_argument("--data-root", type=Path, default=Path("/tmp/tally-bench-detect"),
                   help="stack modes: each stack's data directory is made (afresh) under this one")
    p.add_argument("--keep", action="store_true", help="stack modes: keep the data directories")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    result = run(args.days, args.rate, seeds, args.tolerance_min, args.cache)
    offline_pages = result.pop("_pages")
    print(f"{result['requests']:,} logical requests in {len(seeds)} streams of {args.days:g} days of event time "
          f"(seeds {args.seeds}), {result['incidents']} labelled incidents, {result['seconds']} s")
    print(_table(result))
    for inc in result["missed"]:
        print(f"  missed: {inc}")
    for f, t, s in result["false_pages"]:
        print(f"  false page: {f} at {t} ({s})")
    if args.mode != "offline":
        modes = {"backfill": ["backfill"], "paced": ["paced"], "all": ["backfill", "paced"], "kill": []}[args.mode]
        if args.mode == "kill" and args.kill_process <= 0:
            args.kill_process = 3
        if args.kill_process > 0 and args.mode in ("backfill", "all", "kill"):
            modes.append("backfill-kill9")
        sdk = SdkOptions(args.sdk_batch_events, args.sdk_max_bytes, args.sdk_buffer_ms)
        started = time.monotonic()
        stacked = run_stack_modes(modes, args.days, args.rate, seeds, args.tolerance_min, sdk, args.paced_minutes,
                                  args.speedup, args.kill_process, args.data_root, args.keep)
        table = {"offline": {"tally": result["tally"]}, **stacked}
        print(f"\nthrough the stack ({', '.join(modes)}; {time.monotonic() - started:.0f} s); delays in minutes of "
              f"event time from the incident's start, p90 per kind interpolated between its incidents")
        print(side_by_side(table))
        for m in modes:
            res = stacked[m]
            res["vs_offline"] = compare_pages(res["_pages"], offline_pages)
            if m == "backfill-kill9" and "backfill" in stacked:
                res["vs_backfill"] = compare_pages(res["_pages"], stacked["backfill"]["_pages"])
        for m in modes:
            res = stacked[m]
            print(f"{m}: pages same as offline: {res['vs_offline']['same']} ({res['vs_offline']['common']} common)"
                  + (f"; same as backfill without kills: {res['vs_backfill']['same']}" if "vs_backfill" in res
                     else "")
                  + f"; incidents with a repeated firing row: {len(res['repeated_firing_rows'])}, re-fired "
                  f"(a second page): {len(res['refired_incidents'])}")
            for inc in res["missed"]:
                print(f"  {m} missed: {inc}")
            for f, t, s in res["false_pages"][:20]:
                print(f"  {m} false page: {f} at {t} ({s})")
            if len(res["false_pages"]) > 20:
                print(f"  {m}: {len(res['false_pages']) - 20} more false pages")
            for run_info in res["runs"]:
                print(f"  {m} run: " + orjson.dumps(run_info, default=str).decode())
        for m in modes:
            stacked[m].pop("_pages")
        result["stack"] = stacked
    print("BENCH_DETECT_JSON " + orjson.dumps(result, default=str).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
