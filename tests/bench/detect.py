"""`make bench-detect`: precision, recall and delay of the detectors on a labelled stream, against the seed's z-score.

The stream is the simulator's (ops/simulate.py) over several days of event time: daily seasonality, steady growth,
huge one-off requests (benign), and two injected incidents of every kind (labelled). It runs through the real
validate → enrich → fold code (no Kafka) and the resulting logical requests feed streams.detect.Detector and the
seed's detector (per feature, the last 100 request costs, z > 2). An alert is a true positive when it names the
incident's feature and is raised between the incident's start and `--tolerance-min` after its end. The seed's
detector alerts per request; its alerts are grouped into pages (a new page when the feature had no alert in the
previous 30 minutes) so that both are compared as pages. Figures are printed, not asserted.
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

PARTITIONS = 4
SEED_PAGE_GAP = timedelta(minutes=30)


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
                          "delays": delays}
    every_delay = [d for v in per_kind.values() for d in v.pop("delays")]
    recalls = [v["recall"] for v in per_kind.values()]
    delays_all = [v["delay_min"] for v in per_kind.values() if v["delay_min"] is not None]
    return {"pages": len(pages), "true_pages": true_pages,
            "precision": true_pages / len(pages) if pages else 0.0,
            "recall": sum(recalls) / len(recalls), "median_delay_min": statistics.median(delays_all)
            if delays_all else None, "median_delay_all_min": statistics.median(every_delay) if every_delay else None,
            "p90_delay_min": statistics.quantiles(every_delay, n=10)[-1] if len(every_delay) > 1 else None,
            "per_kind": per_kind}


def detect_stream(days: float, rate: float, seed: int, cache: Path | None
                  ) -> tuple[list[Incident], Outcome, Outcome, int]:
    """One seed's stream through both detectors: its incidents, both detectors' pages, and its request count."""
    start = datetime(2026, 11, 1, tzinfo=UTC)  # fixed: the same seed gives the same stream (and cache) every day
    profile, incidents = scenario(start, days, seed)
    gen = TrafficGenerator(catalog_from_reference(reference_docs()), seed=seed, start=start, rate=rate,
                           bad_rate=0.0, profile=profile)
    detector = Detector(DetectConfig())
    seed_detector = ZScoreBaseline()
    ours, theirs = Outcome(), Outcome()
    last_seed_alert: dict[str, datetime] = {}
    opened: set[str] = set()
    requests = 0
    for partition, rows, marks in cached_requests(gen, start + timedelta(days=days), cache):
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
            "missed": [f"{i.kind} on {i.feature_id} at {i.start:%d %H:%M}" for i in incidents
                       if not any(f == i.feature_id and i.start <= t <= i.end + tolerance for f, t, _ in ours.pages)],
            "false_pages": [(f, t.isoformat(), s) for f, t, s in ours.pages
                            if not any(f == i.feature_id and i.start <= t <= i.end + tolerance for i in incidents)]}


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
    """Print the detection table and a BENCH_DETECT_JSON line."""
    p = argparse.ArgumentParser(prog="python -m tests.bench.detect", description=__doc__)
    p.add_argument("--days", type=float, default=2.5, help="days of event time per stream")
    p.add_argument("--rate", type=float, default=3.0, help="logical requests per second of event time (mean)")
    p.add_argument("--seeds", default="7,11", help="one stream per seed, scored together")
    p.add_argument("--cache", type=Path, help="keep each stream's logical requests in files named after this one "
                   "(and its seed, days and rate) and replay them next time")
    p.add_argument("--tolerance-min", type=float, default=15.0, help="minutes after an incident an alert still counts")
    args = p.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    result = run(args.days, args.rate, seeds, args.tolerance_min, args.cache)
    print(f"{result['requests']:,} logical requests in {len(seeds)} streams of {args.days:g} days of event time "
          f"(seeds {args.seeds}), {result['incidents']} labelled incidents, {result['seconds']} s")
    print(_table(result))
    for inc in result["missed"]:
        print(f"  missed: {inc}")
    for f, t, s in result["false_pages"]:
        print(f"  false page: {f} at {t} ({s})")
    print("BENCH_DETECT_JSON " + orjson.dumps(result, default=str).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
