"""The `tally` command line: parses arguments, builds settings, starts things."""

from __future__ import annotations

import csv
import io
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ops.simulate import INCIDENT_KINDS
from tally.config import ROLES, Settings, load_settings
from tally.errors import TallyError

console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(width=None if sys.stdout.isatty() else 200)

EXAMPLE_REFERENCE = (Path(__file__).resolve().parent.parent / "examples" / "reference")


class Ctx:
    """Global options, turned into Settings on first use (so `--help` never touches config)."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        self.overrides = overrides
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(**self.overrides).validated()
        return self._settings


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--data-dir", type=click.Path(path_type=Path),
              help="Data directory (default .tally; env TALLY_DATA_DIR).")
@click.option("--bootstrap", "kafka_bootstrap", help="Kafka bootstrap servers (default 127.0.0.1:9092).")
@click.option("--clickhouse-url", help="chdb:///path (default: under the data dir) or http(s)://user:pass@host:port.")
@click.option("--topic-prefix", help="Prefix for every topic name (default none).")
@click.option("--partitions", type=int, help="Partitions per topic when tally creates them (default 4).")
@click.option("--web-port", type=int, help="Worker HTTP port: query API and status (default 6066).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
@click.pass_context
def cli(ctx: click.Context, **overrides: Any) -> None:
    """tally: every LLM dollar gets an owner, a price-card version and a logical request, exactly once.

    Settings come from TALLY_* environment variables (e.g. TALLY_KAFKA_BOOTSTRAP, TALLY_CLICKHOUSE_URL) and
    these options, which win.
    """
    ctx.obj = Ctx(overrides)


# ---------------------------------------------------------------- the stack
@cli.command()
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Reference files to load first (default: the price card imported from genai-prices, the sample "
                   "org and budgets).")
@click.option("--rate", type=float, default=300.0, show_default=True, help="Simulated events per second.")
@click.option("--seed", type=int, default=None, help="Simulator seed (default: time-based).")
@click.option("--no-simulate", is_flag=True, help="Start the stack without simulated traffic.")
@click.option("--gateways", type=click.IntRange(min=0), default=0, show_default=True,
              help="Send the simulated traffic through this many gateways' admission clients (budgets, policy).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Process workers beside the sink, each an OS process [default: the cores less one, at least 1].")
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="One worker of this role instead (all: every stage in one process).")
@pass_ctx
def run(c: Ctx, references: tuple[Path, ...], rate: float, seed: int | None, no_simulate: bool,
        workers: int | None, role: str | None, gateways: int) -> None:
    """Run the whole local stack in the foreground: Kafka, workers, traffic simulator, live status. Ctrl-C stops.

    The sink and the process workers run as separate OS processes (`--workers N`), as in production.
    """
    from ops import stack
    from ops.kafka_local import LocalKafka
    from tally.dashboard import PAGE_PATH

    s = c.settings
    with StopOnSignal(console.print) as stopper:
        console.print(f"[bold]tally[/] starting the local stack in {s.data_dir}")
        info = stack.up(s, role, workers)
        stop = threading.Event()
        sim_thread: threading.Thread | None = None
        pager: threading.Thread | None = None
        try:
            console.print(f"  kafka      {s.kafka_bootstrap} "
                          f"({'started' if info['kafka_started'] else 'already running'})")
            for w in info["workers"]:
                console.print(f"  worker     {w['name']:<10} pid {w['pid']}, log {w['log']}")
            console.print(f"  clickhouse {s.redacted_ch_url()}")
            console.print(f"  dashboard  {s.web_url}{PAGE_PATH}  (live; Grafana dashboards in deploy/grafana/)")
            docs = _load_reference(s, references or _run_reference_files())
            console.print(f"  reference  {len(docs)} versions loaded")
            # The simulated traffic calls the sample card's models (a realistic mix; every one is in the imported
            # card), not each of the hundreds of models a full card lists.
            if not references:
                from tally.reference import load_reference_files

                sim_docs = load_reference_files(_example_reference_files())
            else:
                sim_docs = docs
            sim_counter = [0]
            if not no_simulate:
                sim_thread = threading.Thread(target=_simulate_until, name="simulator",
                                              args=(s, sim_docs, rate, seed, stop, sim_counter, gateways),
                                              daemon=True)
                sim_thread.start()
                console.print(f"  simulator  {rate:g} events/s"
                              + (f" through {gateways} gateways' admission (budgets, routing policy)" if gateways
                                 else ""))
            pager = threading.Thread(target=_page_to_stdout, name="pager", args=(s, stop), daemon=True)
            pager.start()
            console.print("  pager      anomaly and budget alerts print here, one line each "
                          "(`tally alerts --sink console`)")
            console.print('\nQuery it from another shell:\n  tally query "SELECT team_id, sum(cost_total_usd) '
                          'FROM tally.usage_events GROUP BY team_id ORDER BY 2 DESC"\nCtrl-C stops everything.\n')
            _show_status(s, stopper.requested, sim_counter)
        finally:
            console.print("stopping…")
            stop.set()
            for thread in (sim_thread, pager):
                if thread is not None:
                    thread.join(timeout=30)
            stack.stop_workers(s)
            if info["kafka_started"]:
                LocalKafka(s).stop()
            console.print("stopped.")


class StopOnSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask a foreground command to stop instead of interrupting it wherever it is.

    The first signal sets `requested` (the command winds down at its next check); a later one only says that
    stopping is under way, so the shutdown itself (threads, workers, Kafka) is never cut short, ends with its
    "stopped." line and exits 0: `make run` ends cleanly, not with "Error 130". The previous handlers come back
    on exit.
    """

    def __init__(self, say: Callable[[str], Any]) -> None:
        self.requested = threading.Event()
        self._say = say
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            self._say("still stopping: waiting for what runs to shut down")
        self.requested.set()


def _show_status(s: Settings, stop: threading.Event, sim_counter: list[int]) -> None:
    """`tally run`'s status until `stop` is set: a live line on a terminal, else one line every 5 seconds."""
    last = (time.monotonic(), 0)
    if console.is_terminal:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not stop.wait(1.0):
                line, last = _status_line(s, last, sim_counter[0])
                live.update(line)
        return
    while not stop.wait(5.0):  # not a terminal (piped to a file)
        line, last = _status_line(s, last, sim_counter[0])
        console.print(line)


def _status_line(s: Settings, last: tuple[float, int], published: int) -> tuple[str, tuple[float, int]]:
    """One line of `tally run`'s live status, whatever the layout.

    What has landed in ClickHouse, read through the sink's API, and the process role's own input position (tally's,
    not a consumer group's).
    """
    from ops import stack
    from ops.kafka_admin import end_offsets, lag
    from ops.wait import process_positions

    try:
        spend = stack.api(s, "/api/query", {"sql": "SELECT toString(sum(cost_total_usd)), count() "
                                                   "FROM tally.usage_events"}, timeout=5)["rows"][0]
        folded = stack.api(s, "/api/query", {"sql": "SELECT sum(sign), toString(sum(sign * cost_wasted_usd)) "
                                                    "FROM tally.logical_requests"}, timeout=5)["rows"][0]
        ends = end_offsets(s.kafka, s.topics.usage)
        behind = lag(ends, process_positions(s))
        dead = sum(end_offsets(s.kafka, s.topics.dlq).values())
    except (OSError, TallyError) as exc:
        return f"[yellow]worker not answering: {exc}[/]", last
    now = time.monotonic()
    rows = int(spend[1])
    rate = (rows - last[1]) / max(now - last[0], 1e-6)
    line = (f"published {published:>9,}  rows {rows:>9,}  [bold]{rate:8,.0f} rows/s[/]  lag {behind:>5} msgs  "
            f"dead-letter msgs {dead:>5,}  spend [bold green]${Decimal(spend[0]):,.4f}[/]"
            f"  requests {int(folded[0]):>9,}  waste ${Decimal(folded[1]):,.4f}")
    return line, (now, rows)


def _page_to_stdout(s: Settings, stop: threading.Event) -> None:
    from ops.alerts import AlertsConfig, run_alerts

    try:
        run_alerts(s, AlertsConfig(sinks=("console",)).validated(), stop)
    except TallyError as exc:
        console.print(f"[red]pager stopped: {exc}[/]")


def _simulate_until(s: Settings, docs: Sequence[Any], rate: float, seed: int | None, stop: threading.Event,
                    counter: list[int], gateways: int = 0) -> None:
    from ops.simulate import TrafficGenerator, catalog_from_reference, publish_paced
    from tally.sdk.publisher import Publisher

    gen = TrafficGenerator(catalog_from_reference(docs), seed=seed if seed is not None else int(time.time()),
                           rate=rate, live=True)
    admitted = _simulated_gateways(s, gateways) if gateways else None
    try:
        with Publisher(s.kafka, s.topics.usage, partitions=s.partitions) as pub:
            lines = admitted[0].lines(gen, 10**12) if admitted else gen.lines(10**12)
            publish_paced(pub.publish_line, lines, rate, stop.is_set, counter)
    finally:
        if admitted:
            admitted[1].flush()
            for follower in admitted[2]:
                follower.stop()


@cli.command()
@click.option("--role", type=click.Choice(ROLES), default=None,
              help="Start one worker of this role instead of the default stack (all: every stage in one process).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Process workers beside the sink [default: the cores less one, at least 1].")
@pass_ctx
def up(c: Ctx, role: str | None, workers: int | None) -> None:
    """Start Kafka, create topics and start the workers in the background (for scripts).

    By default the sink and the process workers run as separate OS processes (`tally status` lists them).
    """
    from ops import stack

    info = stack.up(c.settings, role, workers)
    out.print_json(orjson.dumps(info).decode())


@cli.command()
@pass_ctx
def down(c: Ctx) -> None:
    """Stop the background workers and the local Kafka broker."""
    from ops import stack

    stopped = stack.down(c.settings)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@cli.command()
@pass_ctx
def status(c: Ctx) -> None:
    """Kafka, workers, consumer lag and worker counters."""
    from ops import stack
    from ops.kafka_admin import committed_offsets, end_offsets, lag
    from ops.kafka_local import LocalKafka

    s = c.settings
    table = Table(title="tally status", show_header=False)
    ks = LocalKafka(s).status()
    table.add_row("kafka", f"{s.kafka_bootstrap}  running={ks.get('running')} pid={ks.get('pid')}")
    for name, pid in stack.running_workers(s).items():
        table.add_row(f"worker {name}", f"pid {pid}  log {stack.log_file(s, name)}")
    try:
        otlp = ((s.topics.otlp, ("all", "process")),) if s.topics.otlp else ()
        for topic, roles in (*otlp, (s.topics.usage, ("all", "process")), (s.topics.attempts, ("all", "sink")),
                             (s.topics.requests, ("all", "sink"))):
            ends = end_offsets(s.kafka, topic)
            for role in roles:
                committed = committed_offsets(s.kafka, s.group_id(role), topic, list(ends))
                if any(v >= 0 for v in committed.values()):
                    table.add_row(f"lag {role}", f"{topic}: {lag(ends, committed)} messages")
    except TallyError as exc:
        table.add_row("kafka", f"[red]{exc}[/]")
    try:
        st = stack.api(s, "/api/status", timeout=2)
        table.add_row("worker api", ", ".join(f"{k}={_status_value(k, v)}" for k, v in st.items()))
    except (OSError, TallyError):
        table.add_row("worker api", f"not answering on {s.web_url}")
    out.print(table)


def _status_value(key: str, value: Any) -> str:
    """A worker status counter for people: epoch-second times (started_at, last_insert_at, …) as ISO 8601 UTC."""
    if key.endswith("_at") and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return str(value)


@cli.command()
@click.option("--role", type=click.Choice(ROLES), default="all", show_default=True)
@pass_ctx
def worker(c: Ctx, role: str) -> None:
    """Run a worker in the foreground: process (validate, enrich, price), sink (ClickHouse) or all."""
    from streams.app import run_worker

    logging.basicConfig(level=c.settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.argv = [sys.argv[0]]  # Faust's worker parses argv; ours are already consumed
    run_worker(c.settings, role)


@cli.command()
@click.argument("topic")
@click.option("--messages", "-n", type=int, default=10, show_default=True,
              help="the last N messages of each partition (0: all)")
@click.option("--partition", "partitions", type=int, multiple=True, help="only these partitions (repeatable)")
@click.option("--follow", "-f", is_flag=True, help="keep printing new messages until interrupted")
@pass_ctx
def tail(c: Ctx, topic: str, messages: int, partitions: tuple[int, ...], follow: bool) -> None:
    """Print a tally topic as JSON lines (Arrow attempts messages too), e.g. `tally tail llm.cost.attempts.v1`."""
    from ops.tail import tail as run_tail

    out = sys.stdout.buffer

    def write(line: bytes) -> None:
        out.write(line + b"\n")
        out.flush()

    try:
        run_tail(c.settings.kafka, topic, messages, follow, write, list(partitions) or None)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------- traffic
def _lines(path: str) -> Iterator[bytes]:
    fh = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115 - closed below
    try:
        for raw in fh:
            line = raw.rstrip(b"\r\n")
            if line.strip():
                yield line
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


@cli.command()
@click.argument("file")
@click.option("--topic", help="Target topic (default: the usage topic).")
@pass_ctx
def publish(c: Ctx, file: str, topic: str | None) -> None:
    """Publish a JSONL file (`-` for stdin) through the SDK's batching; each line's bytes are sent unchanged."""
    from tally.sdk.publisher import Publisher

    s = c.settings
    total = None
    if file != "-":
        with open(file, "rb") as fh:
            total = sum(1 for line in fh if line.strip())
    count = 0
    with Progress(TextColumn("publishing"), BarColumn(), TextColumn("{task.completed:,}/{task.total:,} lines"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("publish", total=total)
        with Publisher(s.kafka, topic or s.topics.usage) as pub:
            for line in _lines(file):
                pub.publish_line(line)
                count += 1
                if count % 2000 == 0:
                    progress.update(task, completed=count)
        progress.update(task, completed=count)
    console.print(f"published {count:,} lines to {topic or s.topics.usage}")


@cli.command()
@click.option("--rate", type=float, default=500.0, show_default=True, help="Events per second.")
@click.option("--duration", type=float, default=None, help="Seconds to run (default: until Ctrl-C).")
@click.option("--count", type=int, default=None, help="Stop after this many lines.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--bad-rate", type=float, default=0.003, show_default=True, help="Share of malformed lines.")
@click.option("--reference", "references", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Reference files the traffic is drawn from (default: the samples).")
@click.option("--output", type=click.Path(path_type=Path), help="Write JSONL here instead of publishing.")
@click.option("--incident", type=click.Choice(INCIDENT_KINDS), default=None,
              help="Send only an incident's traffic (on top of a running stack's): e.g. retry_storm.")
@click.option("--incident-feature", default=None,
              help="The feature the incident hits (default: the busiest feature of the traffic).")
@click.option("--incident-tenant", default="tenant-031", show_default=True, help="The tenant of a runaway_loop.")
@click.option("--gateways", type=click.IntRange(min=0), default=0, show_default=True,
              help="Decide every request through this many simulated gateways' admission clients first (the "
                   "stack's budgets and routing policy): denied requests are not sent, fallbacks are.")
@click.option("--otlp", type=click.Choice(["otlp_proto", "otlp_json"]), default=None,
              help="Send the traffic as OTel GenAI spans to the OTLP topic, as the Collector's Kafka exporter "
                   "writes them in this encoding (docs/otlp.md), instead of as events to llm.usage.v1.")
@pass_ctx
def simulate(c: Ctx, rate: float, duration: float | None, count: int | None, seed: int, bad_rate: float,
             references: tuple[Path, ...], output: Path | None, incident: str | None, incident_feature: str | None,
             incident_tenant: str, gateways: int, otlp: str | None) -> None:
    """Realistic synthetic gateway traffic through the SDK (or to a file with --output).

    With --incident, only that incident's requests are sent (every request on one feature, shaped by the
    incident), so that with `tally run` going the feature's traffic changes the way the incident changes it, and
    the detectors page once they have warmed up (TALLY_DETECT_WARMUP_WINDOWS windows of that feature).
    """
    from datetime import UTC, datetime, timedelta

    from ops.simulate import Incident, Profile, TrafficGenerator, catalog_from_reference
    from tally.reference import load_reference_files

    docs = load_reference_files(list(references or _example_reference_files()))
    catalog = catalog_from_reference(docs)
    profile = None
    if incident is not None:
        feature = incident_feature or catalog.features[0][0]
        if feature not in {f[0] for f in catalog.features}:
            raise click.BadParameter(f"{feature!r} is not a feature of the owners registry",
                                     param_hint="--incident-feature")
        now = datetime.now(UTC)
        profile = Profile(incidents=(Incident(incident, feature, now, now + timedelta(days=365), incident_tenant),),
                          only_incident=True)
        console.print(f"incident {incident} on {feature} from {now:%H:%M:%S} UTC")
    if otlp and (output is not None or gateways):
        raise click.UsageError("--otlp publishes spans to the OTLP topic: it goes without --output and --gateways")
    # a malformed line has no span to become: OTLP traffic is all well-formed
    gen = TrafficGenerator(catalog, seed=seed, rate=rate, bad_rate=0.0 if incident or otlp else bad_rate,
                           profile=profile, live=output is None)
    limit = count if count is not None else (int(rate * duration) if duration else 10**12)
    if output is not None:
        with output.open("wb") as fh:
            n = 0
            for line in gen.lines(limit):
                fh.write(line + b"\n")
                n += 1
        console.print(f"wrote {n:,} lines to {output}")
        return
    from ops.simulate import publish_paced
    from tally.sdk.publisher import Publisher

    s = c.settings
    sent = [0]
    started = time.monotonic()
    admitted = _simulated_gateways(s, gateways) if gateways else None
    if otlp:
        from ops.otlp_traffic import SpanPublisher

        if not s.topics.otlp:
            raise TallyError("--otlp needs the OTLP input: otlp_topic is empty")
        try:
            with SpanPublisher(s.kafka, s.topics.otlp, encoding=otlp) as spans:
                publish_paced(spans.publish_line, gen.lines(limit), rate, sent=sent)
        except KeyboardInterrupt:
            pass
        console.print(f"published {sent[0]:,} events as {otlp} spans to {s.topics.otlp} in "
                      f"{time.monotonic() - started:.1f}s")
        return
    try:
        with Publisher(s.kafka, s.topics.usage) as pub:
            lines = admitted[0].lines(gen, limit) if admitted else gen.lines(limit)
            publish_paced(pub.publish_line, lines, rate, sent=sent)
    except KeyboardInterrupt:
        pass
    finally:
        if admitted:
            sim, decisions, followers = admitted
            decisions.flush()
            for follower in followers:
                follower.stop()
            console.print(f"admission through {gateways} gateways: {sim.admitted:,} admitted, {sim.fallbacks:,} "
                          f"routed to a fallback model, {sim.denied:,} denied")
    console.print(f"published {sent[0]:,} lines in {time.monotonic() - started:.1f}s")


def _simulated_gateways(s: Settings, n: int) -> tuple[Any, Any, list[Any]]:
    """Return N admission clients and the producer of their decisions.

    Each follows the stack's topics and holds at most 1/N of what a budget has left.
    """
    from decimal import Decimal

    from ops.simulate import SimulatedGateways
    from tally.sdk.admission import Admission, Follower, KafkaDecisions

    t = s.topics
    decisions = KafkaDecisions(s.kafka, t.budget_decisions)
    admissions = [Admission(f"sim-gw-{i + 1}", publish=decisions.publish, share=Decimal(1) / n) for i in range(n)]
    followers = [Follower(a, s.kafka, t.budget_state, (t.price_cards, t.policies)).start(60) for a in admissions]
    return SimulatedGateways(admissions), decisions, followers


# ---------------------------------------------------------------- reference data
@cli.group()
def reference() -> None:
    """Reference data: price cards and the owners registry (effective-dated, versioned)."""


def _example_reference_files() -> list[Path]:
    return sorted(EXAMPLE_REFERENCE.glob("*.yaml"))


def _run_reference_files() -> list[Path]:
    """What `tally run` loads by default: the imported card, the model alias table, the samples' org and budgets."""
    from ops.reference_import import GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH

    return [GENAI_PRICES_CARD_PATH, MODEL_ALIASES_PATH] + [p for p in _example_reference_files()
                                                           if p.name != "price_cards.yaml"]


def _load_reference(s: Settings, paths: Sequence[Path]) -> list[Any]:
    from confluent_kafka import Producer

    from tally.reference import load_reference_files

    docs = load_reference_files(list(paths))
    # The alias table decides what a card prices, so it travels on the cards' topic (keys kind:version differ).
    topic_of = {"price_card": s.topics.price_cards, "model_aliases": s.topics.price_cards, "owners": s.topics.owners,
                "budgets": s.topics.budgets, "routing_policy": s.topics.policies}
    errors: list[str] = []
    producer = Producer({**s.kafka.rdkafka(), "enable.idempotence": True, "acks": "all",
                         "log_level": 3})  # retries while a fresh broker loads its coordinator are not news

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(f"{msg.topic()}: {err}")

    for doc in docs:
        producer.produce(topic_of[doc.kind], key=doc.key(), value=doc.to_json(), on_delivery=delivered)
    remaining = producer.flush(30)
    if remaining or errors:
        raise TallyError(f"reference load failed: {remaining} undelivered; " + "; ".join(errors))
    return docs


@reference.command("load")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@pass_ctx
def reference_load(c: Ctx, paths: tuple[Path, ...]) -> None:
    """Validate reference files and publish them to the compacted reference topics (workers pick them up live)."""
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) if p.is_dir() else [p])
    docs = _load_reference(c.settings, files)
    for d in docs:
        console.print(f"loaded {d.kind} {d.version} effective {d.effective_at.isoformat()}")


@reference.command("import")
@click.argument("source", type=click.Choice(["genai-prices"]))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the price-card YAML here (default: stdout).")
@click.option("--provider", "providers", multiple=True,
              help="A genai-prices provider id to import (repeatable; default: every mapped provider).")
def reference_import(source: str, out: Path | None, providers: tuple[str, ...]) -> None:
    """Convert the installed genai-prices data (with its price history) into tally's effective-dated price cards.

    One card version per price change. What the card cannot express is listed on stderr (and in the README).
    Publish the result with `tally reference load`.
    """
    from ops.reference_import import PROVIDERS, import_genai_prices

    try:
        result = import_genai_prices(providers or None)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--provider") from exc
    if out is None:
        sys.stdout.write(result.text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.text, encoding="utf-8")
    chosen = providers or tuple(PROVIDERS)
    console.print(f"{source} {result.package_version}: providers {', '.join(f'{p}→{PROVIDERS[p]}' for p in chosen)}")
    for version, effective_at, n in result.versions:
        console.print(f"  {version}  effective {effective_at:%Y-%m-%dT%H:%M:%SZ}  {n} models")
    console.print(f"{len(result.gaps)} things the card cannot express (what the import did instead):")
    for gap in result.gaps:
        console.print(f"  {gap.line()}", markup=False, highlight=False)
    if out is not None:
        console.print(f"wrote {len(result.versions)} versions to {out}")


@cli.command("price")
@click.argument("event_file", required=False, type=click.File("r", encoding="utf-8"))
@click.option("--provider", help="The event's provider (instead of an event file).")
@click.option("--model", help="The model as the gateway sent it (model_actual).")
@click.option("--tokens", "tokens", multiple=True, metavar="CLASS=N",
              help="Token counts, repeatable: input=1200 output=300 reasoning=900 cache_read=0 cache_write=0 "
                   "cache_write_1h=0.")
@click.option("--at", "at_text", help="Event time, RFC 3339 (default: now).")
@click.option("--batch", is_flag=True, help="A batch API call.")
@click.option("--service-tier", default="", help="Service tier (priority, flex, …; default standard).")
@click.option("--tool", "tools", multiple=True, metavar="NAME=CALLS", help="Tool calls, repeatable: web_search=2.")
@click.option("--price-cards", "card_paths", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Price-card and model-alias YAML files or directories (default: what the stack has loaded).")
@click.option("--json", "as_json", is_flag=True, help="Print the explanation as one JSON object.")
@pass_ctx
def price(c: Ctx, event_file: Any, provider: str | None, model: str | None, tokens: tuple[str, ...],
          at_text: str | None, batch: bool, service_tier: str, tools: tuple[str, ...], card_paths: tuple[Path, ...],
          as_json: bool) -> None:
    """Price one usage event with the card in effect at its time, line by line: "why did this cost that".

    Give a usage event as JSON (EVENT_FILE, `-` for stdin: one event, as the gateway published it), or describe
    one with --provider, --model and --tokens. Shows the card version, how the model name was matched (exact, card
    alias, model alias rule, dated snapshot), the rates after batch and tier multipliers, each class's cost and
    the total, with the pipeline's pricing status and note: the same figures a usage_events row holds.
    """
    from ops import price as pricing
    from ops.reports.rating import pricing_snapshot
    from tally.sdk.events import usage_event

    if event_file is not None:
        if provider or model or tokens or tools or at_text or batch or service_tier:
            raise click.UsageError("give either an event file or --provider/--model/--tokens, not both")
        event = pricing.event_from_text(event_file.read())
    else:
        if not provider or not model:
            raise click.UsageError("give an event file (or - for stdin), or --provider and --model")
        usage = {_usage_key(k): v for k, v in _pairs(tokens, "--tokens").items()}
        try:
            described = usage_event(
                request_id="tally-price", provider=provider, model_actual=model, usage=usage, tags={},
                timestamp=at_text or datetime.now(UTC), batch=batch or None, service_tier=service_tier or None,
                tool_calls=_pairs(tools, "--tool") or None)
        except ValueError as exc:  # the SDK's own check of the timestamp
            raise click.BadParameter(str(exc), param_hint="--at") from None
        event = pricing.checked(described)
    refs, _ = pricing_snapshot(c.settings, card_paths)
    explained = pricing.explain(event, refs)
    if as_json:
        sys.stdout.write(orjson.dumps(explained.as_json()).decode() + "\n")
    else:
        sys.stdout.write(pricing.render(explained))


def _usage_key(name: str) -> str:
    from tally.sdk.normalize import USAGE_KEYS

    key = name if name.endswith("_tokens") else f"{name}_tokens"
    if key not in USAGE_KEYS:
        raise click.BadParameter(f"{name!r} is not a token class; one of {', '.join(k[:-7] for k in USAGE_KEYS)}",
                                 param_hint="--tokens")
    return key


def _pairs(items: tuple[str, ...], option: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=COUNT", param_hint=option)
        out[name] = int(value)
    return out


# ---------------------------------------------------------------- paging
@cli.command("alerts")
@click.option("--sink", "sinks", multiple=True, default=("stdout",), show_default=True,
              type=click.Choice(["stdout", "console", "pagerduty", "slack", "webhook"]), envvar="TALLY_ALERTS_SINKS",
              help="Where to page (repeatable).")
@click.option("--pagerduty-url", envvar="TALLY_PAGERDUTY_URL", default=None,
              help="PagerDuty Events API v2 endpoint (default: PagerDuty's).")
@click.option("--pagerduty-routing-key", envvar="TALLY_PAGERDUTY_ROUTING_KEY", default="", show_envvar=True,
              help="Integration key of the PagerDuty service.")
@click.option("--slack-webhook-url", envvar="TALLY_SLACK_WEBHOOK_URL", default="", show_envvar=True,
              help="Slack-compatible incoming webhook.")
@click.option("--webhook-url", envvar="TALLY_WEBHOOK_URL", default="", show_envvar=True,
              help="Generic JSON webhook.")
@click.option("--renotify", "renotify_s", type=float, default=1800.0, show_default=True,
              help="Seconds between reminders while an incident stays open.")
@click.option("--http-timeout", "http_timeout_s", type=float, default=10.0, show_default=True)
@click.option("--max-messages", type=int, default=None, help="Stop after this many Kafka messages (scripts).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, envvar="TALLY_ALERTS_METRICS_PORT",
              show_envvar=True, help="Serve Prometheus metrics on this port of web_host (0: none).")
@pass_ctx
def alerts_cmd(c: Ctx, sinks: tuple[str, ...], pagerduty_url: str | None, pagerduty_routing_key: str,
               slack_webhook_url: str, webhook_url: str, renotify_s: float, http_timeout_s: float,
               max_messages: int | None, metrics_port: int) -> None:
    """Consume llm.cost.alerts.v1 and page: one page per open incident, reminders, resolves; survives a crash."""
    from ops.alerts import DEFAULT_PAGERDUTY_URL, AlertsConfig, AlertsStats, run_alerts, serve_metrics

    config = AlertsConfig(sinks=tuple(sinks), pagerduty_url=pagerduty_url or DEFAULT_PAGERDUTY_URL,
                          pagerduty_routing_key=pagerduty_routing_key, slack_webhook_url=slack_webhook_url,
                          webhook_url=webhook_url, renotify_s=renotify_s, http_timeout_s=http_timeout_s).validated()
    stats = AlertsStats()
    server = serve_metrics(stats, c.settings.web_host, metrics_port) if metrics_port else None
    try:
        with StopOnSignal(console.print) as stopper:
            run_alerts(c.settings, config, stopper.requested, max_messages, stats=stats)
    finally:
        if server is not None:
            server.shutdown()
    console.print(f"alerts: {stats.messages:,} messages, {stats.records:,} records, {stats.open_incidents} open "
                  f"incidents; delivered {dict(stats.delivered) or 'nothing'}")


# ---------------------------------------------------------------- reading
@cli.command("wait")
@click.option("--timeout", type=float, default=120.0, show_default=True)
@pass_ctx
def wait_cmd(c: Ctx, timeout: float) -> None:
    """Block until everything published so far is processed and in ClickHouse (or in the DLQ)."""
    from ops.wait import wait_processed

    report = wait_processed(c.settings, timeout)
    otlp = f"{report.otlp_messages:,} OTLP messages, " if report.otlp_messages else ""
    console.print(f"processed: {otlp}{report.usage_messages:,} input messages, {report.attempt_messages:,} attempt "
                  f"messages, {report.request_messages:,} logical-request messages ({report.seconds:.1f}s)")


def run_query(s: Settings, sql: str) -> tuple[list[str], list[list[Any]]]:
    """One SELECT over tally's tables, through Store.api_query's allow-list and caps.

    Embedded mode: through the running worker (with the API token when set); else directly against ClickHouse.
    """
    from ops import stack
    from tally.store import Store

    if s.embedded:
        try:
            res = stack.api(s, "/api/query", {"sql": sql})
            return res["columns"], res["rows"]
        except OSError:
            pass  # no worker answers: nobody holds the chDB directory, open it directly
    with Store(s) as store:
        r = store.api_query(sql)
        return r.columns, [list(row) for row in r.rows]


def _cell(v: Any, people: bool = False, money: bool = False) -> str:
    """A query result cell as text.

    Decimal exact without ClickHouse's trailing zeros (14.1710897225, not 14.171089722500000000); for people
    (tables) with thousands separators, and money (a `usd` column) to the cent (14.17); datetimes as ISO 8601.
    """
    from ops.reports.output import decimal_text, display_decimal, money_text

    if isinstance(v, Decimal):
        if not people:
            return decimal_text(v)
        return money_text(v) if money else display_decimal(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, datetime):
        return v.isoformat()
    return "" if v is None else str(v)


def _sent_decimal(v: Any) -> Any:
    """A money cell as the worker's API sends a Decimal (exact text, "14.1710897225") back as a Decimal; else as is."""
    from decimal import InvalidOperation

    if not isinstance(v, str):
        return v
    try:
        value = Decimal(v)
    except InvalidOperation:
        return v
    return value if value.is_finite() else v


def _json_cell(v: Any) -> Any:
    if isinstance(v, Decimal):
        from ops.reports.output import decimal_text

        return decimal_text(v)
    return str(v)


@cli.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@pass_ctx
def query(c: Ctx, sql: str, fmt: str) -> None:
    """Run read-only SQL against tally's ClickHouse (embedded mode: through the running worker)."""
    columns, rows = run_query(c.settings, sql)
    if fmt == "json":
        sys.stdout.write(orjson.dumps([dict(zip(columns, r, strict=True)) for r in rows], default=_json_cell,
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        w.writerows([[_cell(v) for v in r] for r in rows])
        sys.stdout.write(buf.getvalue())
    else:
        from ops.reports.output import ROUNDED_NOTE, hides_digits, is_money

        money = [is_money(c) for c in columns]
        rows = [[_sent_decimal(v) if m else v for v, m in zip(r, money, strict=True)] for r in rows]
        table = Table(*columns)
        for r in rows:
            table.add_row(*(_cell(v, people=True, money=m) for v, m in zip(r, money, strict=True)))
        out.print(table)
        if any(m and hides_digits(v) for r in rows for v, m in zip(r, money, strict=True)):
            console.print(ROUNDED_NOTE, style="dim")


@cli.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), default=None,
              help="First UTC day (default: --days before today).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Last UTC day (default: today).")
@click.option("--days", type=int, default=7, show_default=True, help="Days up to --until, when --since is not given.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def verify(c: Ctx, since: Any, until: Any, days: int, fmt: str) -> None:
    """Audit: every rollup grain against usage_events and logical_requests, per UTC day × team × feature.

    Compares attempts, exact cost, requests (sum(sign)) and retry waste; each grain only within its retention.
    Lists every difference and exits 1 if there is any (0: consistent).
    """
    from datetime import UTC, datetime, timedelta

    from ops.verify import verify as run_verify

    s, now = c.settings, datetime.now(UTC)
    last = until.date() if until else now.date()
    first = since.date() if since else last - timedelta(days=max(days, 1) - 1)
    retention = {"minute": s.rollup_minute_retention_days, "hour": s.rollup_hour_retention_days,
                 "day": s.rollup_day_retention_days}
    audit = run_verify(lambda sql: run_query(s, sql), first, last, now, retention)
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"since": audit.since, "until": audit.until, "windows": audit.windows,
                                       "cells": audit.cells, "ok": audit.ok, "differences": audit.differences},
                                      default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for table, (lo, hi) in audit.windows.items():
            console.print(f"{table}: {lo} … {hi}")
        for d in audit.differences:
            out.print(d.describe(), markup=False)
        console.print(f"{audit.cells:,} cells compared, {len(audit.differences)} differences "
                      f"({audit.since} … {audit.until}, UTC)")
    if not audit.ok:
        raise SystemExit(1)


# ---------------------------------------------------------------- reports
REPORT_DESTINATION = "tally.report.destination"


@cli.group("report")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "html"]), default="table",
              show_default=True, help="table (terminal), csv (one table: --table, default the first), json, or "
                                      "html (one self-contained file with charts).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report to this file (default: stdout).")
@click.option("--table", "table_name", default=None, help="Only this table of the report (its machine name).")
@click.pass_context
def report(ctx: click.Context, fmt: str, output: Path | None, table_name: str | None) -> None:
    """Reports from what ClickHouse holds (in embedded mode, through the running worker).

    The options here apply to every report and go before its name, e.g.
    `tally report --format html --output nov.html chargeback --period 2026-11`. Money is exact in CSV and JSON;
    the terminal and HTML tables show it to the cent.
    A long report shows progress on stderr when that is a terminal (never while CSV or JSON go to stdout).
    """
    from ops.reports.output import Destination

    ctx.meta[REPORT_DESTINATION] = Destination(fmt, output, table_name)  # type: ignore[arg-type]


def report_destination() -> Any:
    """The `report` group's Destination (format, output file, table), for its subcommands."""
    return click.get_current_context().meta[REPORT_DESTINATION]


def _chargeback_options(f: Any) -> Any:
    for option in reversed((
            click.option("--period", help="A month, YYYY-MM (default: the current UTC month)."),
            click.option("--from", "start", type=click.DateTime(["%Y-%m-%d"]), help="First day (UTC), with --to."),
            click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), help="Last day (UTC, inclusive)."),
            click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="Shared-costs rules file (YAML, docs/chargeback.md)."),
            click.option("--jump-pp", type=click.FloatRange(0.01, 100), default=5.0, show_default=True,
                         help="A day-over-day change of a team's reasoning share this big (points) is a jump."))):
        f = option(f)
    return pass_ctx(f)


def _run_chargeback(c: Ctx, kind: str, period: str | None, start: Any, last: Any, rules: Path | None,
                    jump_pp: float) -> None:
    from datetime import UTC, datetime

    from ops.reports.chargeback import build_queries, parse_period, run_report
    from ops.reports.output import progress, write_report

    dest = report_destination()
    now = datetime.now(UTC)
    span = parse_period(period, start.date() if start else None, last.date() if last else None, now.date())
    s = c.settings
    source = "embedded chDB" if s.embedded else s.redacted_ch_url()
    with progress(len(build_queries(span, now)), kind, dest.shows_progress) as step:
        rep = run_report("showback" if kind == "showback" else "chargeback", lambda sql: run_query(s, sql), span,
                         rules, now, source, step, Decimal(str(jump_pp)))
    write_report(rep, dest, sys.stdout)
    if dest.output is not None:
        console.print(f"wrote {dest.output}")


@report.command("chargeback")
@_chargeback_options
def report_chargeback(c: Ctx, period: str | None, start: Any, last: Any, rules: Path | None,
                      jump_pp: float) -> None:
    """Per team: direct cost by class, reasoning share and endpoints, retry waste, week over week, unattributed.

    Also deploy markers next to reasoning-share jumps, and shared costs allocated by the rules file (--rules).
    """
    _run_chargeback(c, "chargeback", period, start, last, rules, jump_pp)


@report.command("showback")
@_chargeback_options
def report_showback(c: Ctx, period: str | None, start: Any, last: Any, rules: Path | None, jump_pp: float) -> None:
    """The chargeback's figures as information: nothing is billed; shared costs show what would be charged."""
    _run_chargeback(c, "showback", period, start, last, rules, jump_pp)


def _percent(text: str, option: str = "--threshold") -> Decimal:
    from decimal import InvalidOperation

    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal(-1)
    if not value.is_finite() or value < 0:
        raise click.BadParameter(f"{text!r} is not a percentage ≥ 0", param_hint=option)
    return value


def _wrote(dest: Any) -> None:
    if dest.output is not None:
        console.print(f"wrote {dest.output}")


@report.command("reconcile")
@click.argument("invoice", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--threshold", default="1", show_default=True,
              help="Flag lines, and fail the run, when the variance is over this many percent of the invoice.")
@pass_ctx
def report_reconcile(c: Ctx, invoice: Path, threshold: str) -> None:
    """Compare a provider cost export (CSV) with tally's exact sums per UTC day × provider × model (× class).

    Accepted shapes (detected by header; docs/reports.md): canonical, OpenAI costs export, Anthropic cost report.
    Flags lines over --threshold and lines present on one side only. Exits 3 when the total variance is over
    --threshold (for a weekly job); 2 on bad input.
    """
    from ops.reports.output import progress, write_report
    from ops.reports.reconcile import EXIT_OVER_THRESHOLD, build_report, parse_invoice, reconcile

    dest, s = report_destination(), c.settings
    pct = _percent(threshold)
    inv = parse_invoice(invoice)
    first, last = min(ln.day for ln in inv.lines), max(ln.day for ln in inv.lines)
    with progress((last - first).days + 1, "reconcile", dest.shows_progress) as step:
        rec = reconcile(lambda sql: run_query(s, sql), inv, pct, step)
    source = "embedded chDB" if s.embedded else s.redacted_ch_url()
    write_report(build_report(inv, rec, f"{invoice.name}: {first} … {last} (UTC); tally from {source}"), dest,
                 sys.stdout)
    _wrote(dest)
    if rec.over:
        raise SystemExit(EXIT_OVER_THRESHOLD)


@report.command("sample-invoices")
@click.option("--day", "day_text", default=None,
              help="The UTC day, YYYY-MM-DD (default: today, by the clock the other reports use).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Where to write the files.")
@click.option("--raise-pct", default="3", show_default=True,
              help="invoice.csv bills the model with the most spend this many percent more than tally holds.")
@pass_ctx
def report_sample_invoices(c: Ctx, day_text: str | None, out_dir: Path, raise_pct: str) -> None:
    """Write sample provider cost exports for a day from tally's own sums, to try `tally report reconcile` on.

    invoice.csv (canonical shape, per model, the top model raised by --raise-pct: README's example) and one file
    per accepted shape: invoice_canonical.csv, invoice_openai_costs.csv, invoice_anthropic_cost_report.csv.
    """
    from ops.reports.rating import parse_day
    from ops.reports.reconcile import tally_cells
    from ops.reports.sample_invoices import FILES, sample_invoices

    s = c.settings
    day = parse_day(day_text, "--day") if day_text else datetime.now(UTC).date()
    pct = _percent(raise_pct, "--raise-pct")
    texts = sample_invoices(tally_cells(lambda sql: run_query(s, sql), day, day, None), day, pct)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
        console.print(f"wrote {out_dir / name}: {text.count(chr(10)) - 1} lines, {FILES[name]}")
    console.print(f"try: tally report reconcile {out_dir / 'invoice.csv'}")


@report.command("focus")
@click.option("--period", default=None, help="YYYY-MM, YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD (UTC days, inclusive; "
                                            "default: the current UTC month, as chargeback).")
@click.option("--price-cards", "card_paths", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Price-card YAML files or directories (default: the cards loaded in the stack).")
@click.option("--validate", is_flag=True, help="Check the rows against the FOCUS column rules; exit 2 if any fails.")
@click.option("--rules", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Shared-costs rules file (YAML, docs/chargeback.md): adds the allocated shared costs as rows.")
@pass_ctx
def report_focus(c: Ctx, period: str | None, card_paths: tuple[Path, ...], validate: bool, rules: Path | None) -> None:
    """FOCUS 1.2 export (CSV unless --format says otherwise): one row per day × owner × model × token class.

    PricingQuantity × ListUnitPrice = cost exactly (unit: 1000000 Tokens); SkuPriceId names the price-card version;
    Tags carry team, cost center, product, feature and tenant; the FOCUS 1.3 Allocated* columns are included.
    With --rules, shared costs allocated as by `chargeback --rules` are split-cost-allocation rows (docs/reports.md).
    """
    import dataclasses

    from ops.reports.chargeback import ALLOCATION_QUERIES, load_rules
    from ops.reports.focus import COLUMNS, add_shared_costs, build_report, export_focus, parse_period
    from ops.reports.focus_spec import validate as validate_rows
    from ops.reports.output import progress, write_report
    from ops.reports.rating import price_cards
    from tally.errors import ReportError

    dest, s = report_destination(), c.settings
    fmt_source = click.get_current_context().parent.get_parameter_source("fmt")  # type: ignore[union-attr]
    if fmt_source == click.core.ParameterSource.DEFAULT:
        dest = dataclasses.replace(dest, fmt="csv")
    start, end = parse_period(period or datetime.now(UTC).strftime("%Y-%m"))
    items = load_rules(rules) if rules is not None else None  # a bad rules file fails before any query
    cards = price_cards(s, card_paths)
    steps = (end - start).days + (len(ALLOCATION_QUERIES) if items is not None else 0)
    with progress(steps, "focus", dest.shows_progress) as step:
        export = export_focus(lambda sql: run_query(s, sql), cards, start, end, step)
        if items is not None:
            add_shared_costs(lambda sql: run_query(s, sql), items, start, end, export, step)
    if validate:
        problems = validate_rows(COLUMNS, export.rows)
        if problems:
            raise ReportError(f"the export breaks {len(problems)} FOCUS rules:\n"
                              + "\n".join(f"  - {p}" for p in problems[:20]))
        console.print(f"valid: {len(export.rows):,} rows pass the FOCUS column rules")
    source = ", ".join(map(str, card_paths)) if card_paths else f"topic {s.topics.price_cards}"
    write_report(build_report(export, start, end, source), dest, sys.stdout)
    _wrote(dest)


@report.command("reprice")
@click.option("--from", "start_text", required=True, help="First UTC day, YYYY-MM-DD (inclusive).")
@click.option("--to", "end_text", required=True, help="End UTC day, YYYY-MM-DD (exclusive).")
@click.option("--price-card", "version", required=True, help="The price-card version to re-rate with.")
@click.option("--price-cards", "card_paths", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Price-card YAML files or directories holding it (default: the cards loaded in the stack).")
@click.option("--apply", is_flag=True, help="Store the re-rated rows in repriced_events (default: dry run).")
@pass_ctx
def report_reprice(c: Ctx, start_text: str, end_text: str, version: str, card_paths: tuple[Path, ...],
                   apply: bool) -> None:
    """Re-rate every event of a window with a corrected price card: as billed beside re-rated, per team and model.

    A dry run by default. --apply stores the re-rated rows in repriced_events (idempotent; usage_events stays as
    billed). In embedded mode --apply needs the chDB directory: stop the worker first (`tally down`).
    """
    from ops.reports.output import progress, write_report
    from ops.reports.rating import days, parse_day, price_cards
    from ops.reports.reprice import build_report, reprice, write_repriced
    from tally.errors import ReportError, StoreLockedError
    from tally.store import Store

    dest, s = report_destination(), c.settings
    start, end = parse_day(start_text, "--from"), parse_day(end_text, "--to")
    cards = price_cards(s, card_paths)
    card = cards.get(version)
    if card is None:
        raise ReportError(f"--price-card {version!r}: no such version; known: {', '.join(sorted(cards))}")
    source = ", ".join(map(str, card_paths)) if card_paths else f"topic {s.topics.price_cards}"
    n_days = len(days(start, end))
    if not apply:
        with progress(n_days, "reprice (dry run)", dest.shows_progress) as step:
            result = reprice(lambda sql: run_query(s, sql), card, start, end, False, step)
        write_report(build_report(result, None, source), dest, sys.stdout)
        _wrote(dest)
        return
    try:
        with Store(s) as store:
            if s.embedded:
                store.migrate()
            elif not store.query("EXISTS TABLE {db}.repriced_events").rows[0][0]:
                raise ReportError("table repriced_events is missing: run `tally db migrate` with an admin URL")

            def query(sql: str) -> tuple[list[str], list[list[Any]]]:
                r = store.query(sql)
                return r.columns, [list(row) for row in r.rows]

            with progress(2 * n_days, "reprice", dest.shows_progress) as step:
                result = reprice(query, card, start, end, True, step)
                applied = write_repriced(store, result, step)
    except StoreLockedError as exc:
        raise ReportError(f"reprice --apply writes to the embedded ClickHouse, which a running worker holds "
                          f"({exc}). Stop it (`tally down`), run the apply, then `tally up` again; a dry run works "
                          "while the worker runs.") from None
    write_report(build_report(result, applied, source), dest, sys.stdout)
    _wrote(dest)


@cli.group()
def db() -> None:
    """ClickHouse schema."""


@db.command("migrate")
@pass_ctx
def db_migrate(c: Ctx) -> None:
    """Apply the numbered migrations under schemas/migrations (idempotent)."""
    from tally.store import Store

    with Store(c.settings) as store:
        applied = store.migrate()
    console.print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))


@cli.group("config")
def config_group() -> None:
    """Configuration."""


@config_group.command("validate")
@click.pass_obj
def config_validate(c: Ctx) -> None:
    """Print the effective settings (secrets redacted) and exit non-zero listing every problem."""
    s = load_settings(**c.overrides)
    for key, value in s.to_env().items():
        shown = (s.redacted_ch_url() if value else "") if key == "TALLY_CLICKHOUSE_URL" else value
        out.print(f"{key}={shown}")
    problems = s.problems()
    if problems:
        for p in problems:
            console.print(f"[red]problem:[/] {p}")
        raise SystemExit(2)
    console.print("[green]configuration is valid[/]")


# ---------------------------------------------------------------- kafka
@cli.group()
def kafka() -> None:
    """The project's local Kafka broker (KRaft, single node, loopback)."""


@kafka.command("start")
@pass_ctx
def kafka_start(c: Ctx) -> None:
    """Fetch the jars once, format the log dir once, start the broker and create the topics."""
    from ops.kafka_local import LocalKafka, ensure_topics

    started = time.monotonic()
    LocalKafka(c.settings).start()
    created = ensure_topics(c.settings)
    console.print(f"kafka up on {c.settings.kafka_bootstrap} in {time.monotonic() - started:.1f}s; "
                  f"topics created: {', '.join(created) or 'none (all existed)'}")


@kafka.command("stop")
@pass_ctx
def kafka_stop(c: Ctx) -> None:
    """Stop the broker cleanly (SIGTERM, then wait)."""
    from ops.kafka_local import LocalKafka

    console.print("stopped" if LocalKafka(c.settings).stop() else "not running")


@kafka.command("topics")
@pass_ctx
def kafka_topics(c: Ctx) -> None:
    """Create tally's topics on the cluster at kafka_bootstrap, those that do not exist yet (idempotent).

    What a deployment's setup job runs (deploy/compose.yaml, deploy/k8s/): partitions from TALLY_PARTITIONS,
    reference and state topics compacted. An existing topic with another partition count is an error, not a change.
    """
    from ops.kafka_local import ensure_topics

    created = ensure_topics(c.settings)
    console.print(f"topics: {len(created)} created" + (f" ({', '.join(created)})" if created else ", all exist"))


@kafka.command("status")
@pass_ctx
def kafka_status(c: Ctx) -> None:
    """Whether the broker runs and answers."""
    from ops.kafka_local import LocalKafka

    out.print_json(orjson.dumps(LocalKafka(c.settings).status(), default=str).decode())


# ---------------------------------------------------------------- dead letters
@cli.command("budgets")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def budgets_cmd(c: Ctx, fmt: str) -> None:
    """Budget state as gateways see it (llm.budget.state.v1): spent, forecast and the allow/degrade/deny advice."""
    from streams.roles.budget import read_compacted

    states = sorted(read_compacted(c.settings.kafka, c.settings.topics.budget_state).values(),
                    key=lambda st: (str(st.get("scope")), str(st.get("id")), str(st.get("period"))))
    if fmt == "json":
        sys.stdout.write(orjson.dumps(states, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not states:
        console.print(f"no budget state on {c.settings.topics.budget_state} yet: load budgets with "
                      "`tally reference load` and wait one budget interval")
        return
    from ops.reports.output import money_text

    def usd(v: Any) -> str:
        return money_text(Decimal(str(v))) if v not in (None, "") else ""

    table = Table("budget", "period", "spent USD", "budget USD", "used %", "forecast USD", "forecast %", "advice",
                  "computed at", title=f"budget state: {len(states)}")
    colour = {"allow": "green", "degrade": "yellow", "deny": "red"}
    for st in states:
        advice = str(st.get("recommendation", ""))
        table.add_row(f"{st.get('scope')} {st.get('id')}",
                      f"{st.get('period')} from {str(st.get('period_start', ''))[:10]}", usd(st.get("spent_usd")),
                      usd(st.get("budget_usd")), str(st.get("used_pct", "")), usd(st.get("forecast_usd")),
                      str(st.get("forecast_pct", "")), f"[{colour.get(advice, 'white')}]{advice}[/]",
                      str(st.get("computed_at", "")))
    out.print(table)


@cli.group()
def dlq() -> None:
    """The dead-letter topic: what was refused, why, and how to send it again."""


@dlq.command("show")
@click.option("--limit", type=int, default=20, show_default=True, help="Most recent records to list.")
@click.option("--reason", "reasons", multiple=True, help="Only these reasons.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_ctx
def dlq_show(c: Ctx, limit: int, reasons: tuple[str, ...], fmt: str) -> None:
    """Counts by reason and the most recent dead letters."""
    from ops.dlq import read_dead_letters, select, summarize

    letters = list(select(read_dead_letters(c.settings.kafka, c.settings.topics.dlq), reasons))
    # Newest first: rejected_at, then the source position (one batch's letters share a time).
    letters.sort(key=lambda d: (str(d.record.get("rejected_at")), str(d.record.get("source_topic")),
                                d.record.get("source_partition") or 0, d.record.get("source_offset") or 0,
                                d.record.get("source_line") or 0), reverse=True)
    recent = letters[:limit] if limit else []
    if fmt == "json":
        sys.stdout.write(orjson.dumps({"by_reason": summarize(letters), "recent": [d.record for d in recent]},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    counts = Table("reason", "count", title=f"dead letters: {len(letters):,}")
    for reason, n in summarize(letters).most_common():
        counts.add_row(reason, f"{n:,}")
    out.print(counts)
    table = Table("rejected_at", "reason", "stage", "source", "event_id",
                  title=f"most recent {len(recent)}, newest first")
    table.add_column("message", overflow="fold", ratio=1)  # wrapped whole, never cut mid-word
    for d in recent:
        r = d.record
        table.add_row(str(r.get("rejected_at")), str(r.get("reason")), str(r.get("stage")),
                      f"{r.get('source_topic')}[{r.get('source_partition')}]@{r.get('source_offset')}"
                      f"#{r.get('source_line')}", str(r.get("event_id") or ""), str(r.get("message")))
    out.print(table)


@dlq.command("replay")
@click.option("--reason", "reasons", multiple=True, help="Only dead letters with these reasons.")
@click.option("--event-id", "event_ids", multiple=True, help="Only these event ids.")
@click.option("--set", "sets", multiple=True, help="Edit before replay: field.path=JSON_VALUE (repeatable).")
@click.option("--unset", "unsets", multiple=True, help="Edit before replay: remove field.path (repeatable).")
@click.option("--export", type=click.Path(path_type=Path), help="Write the (edited) lines to a file instead.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed.")
@pass_ctx
def dlq_replay(c: Ctx, reasons: tuple[str, ...], event_ids: tuple[str, ...], sets: tuple[str, ...],
               unsets: tuple[str, ...], export: Path | None, dry_run: bool) -> None:
    """Re-publish dead letters (optionally edited) to the input topic, original bytes unless edited.

    Replaying lines that were already fixed and accepted is harmless: the sink drops event_ids it already holds.
    """
    from ops.dlq import edit_line, parse_assignment, read_dead_letters, select
    from tally.sdk.publisher import Publisher

    s = c.settings
    edits = [parse_assignment(x) for x in sets]
    chosen = [d for d in select(read_dead_letters(s.kafka, s.topics.dlq), reasons, event_ids)
              if d.record.get("source_line") is not None]
    # A span the OTLP input could not map is stored as a one-span OTLP request: it goes back to the OTLP topic,
    # as it is (no line to edit), once the mapping or its instrumentation is fixed.
    spans = [d for d in chosen if d.record.get("stage") == "otlp"]
    chosen = [d for d in chosen if d.record.get("stage") != "otlp"]
    if spans:
        if edits or unsets or export is not None:
            raise TallyError(f"{len(spans):,} of the chosen dead letters are OTLP spans, which replay as they are: "
                             "choose them without --set, --unset or --export (e.g. --reason otlp_unmappable)")
        if not s.topics.otlp:
            raise TallyError("OTLP dead letters replay to the OTLP topic, and otlp_topic is empty (input off)")
        if dry_run:
            console.print(f"{len(spans):,} OTLP spans would be replayed to {s.topics.otlp}")
        else:
            _replay_spans(s, [d.original for d in spans])
            console.print(f"replayed {len(spans):,} OTLP spans to {s.topics.otlp}")
        if not chosen:
            return
    lines = [edit_line(d.original, edits, unsets) for d in chosen]
    if dry_run:
        for line in lines[:20]:
            out.print(line.decode("utf-8", "replace")[:200])
        console.print(f"{len(lines):,} lines would be replayed")
        return
    if export is not None:
        export.write_bytes(b"".join(line + b"\n" for line in lines))
        console.print(f"wrote {len(lines):,} lines to {export}; fix them, then `tally publish {export}`")
        return
    with Publisher(s.kafka, s.topics.usage) as pub:
        for line in lines:
            pub.publish_line(line)
    console.print(f"replayed {len(lines):,} lines to {s.topics.usage}")


def _replay_spans(s: Settings, values: Sequence[bytes]) -> None:
    """One-span OTLP requests back onto the OTLP topic, each a message as the Collector would write it."""
    from confluent_kafka import Producer

    producer = Producer({**s.kafka.rdkafka(), "enable.idempotence": True, "acks": "all"})
    failed: list[str] = []
    for value in values:
        producer.produce(s.topics.otlp, value=value,
                         on_delivery=lambda err, _msg: failed.append(str(err)) if err is not None else None)
    if producer.flush(60) or failed:
        raise TallyError(f"replaying to {s.topics.otlp} failed: {failed[0] if failed else 'not delivered in 60 s'}")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: TallyError becomes a clear message and exit code 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="tally", standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    except click.ClickException as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except TallyError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
