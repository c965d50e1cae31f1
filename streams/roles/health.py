"""Every role's /metrics (Prometheus), /livez and /readyz, and the metrics every worker shares.

Served on the worker's HTTP port: web_port for the sink and all roles (beside the API), process_web_port for a
process worker. /metrics needs the API's bearer token when one is configured (Prometheus sends it: see
deploy/prometheus/); the probes do not (a kubelet sends none), and they reveal only check names and verdicts.
The metric names are listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
from faust.types import TP
from faust.web import Request, Response, View
from prometheus_client.core import Metric

from streams.auth import UNAUTHORIZED, authorized
from streams.metrics import Check, counter, gauge, verdict
from streams.roles.context import RoleContext


def wire_health(ctx: RoleContext) -> None:
    """The heartbeat timer, the three pages, and the worker-wide metric sources."""
    app, settings, stats, metrics = ctx.app, ctx.settings, ctx.stats, ctx.metrics
    role = stats.role

    @app.timer(interval=1.0, name="tally.heartbeat")
    async def heartbeat() -> None:
        ctx.heartbeat.beat()

    def lags() -> list[tuple[str, str, int, int]]:
        """(topic, stage, partition, messages behind) of every partition a stage of this worker owns."""
        consumer: Any = app.consumer
        out = []
        for (topic, stage), guard in ctx.guards.items():
            for p, want in sorted(guard.expected.items()):
                try:
                    high = consumer.highwater(TP(topic, p))
                except Exception:  # noqa: S112 - not fetched yet, or between assignments: no figure yet
                    continue
                if high is not None:
                    out.append((topic, stage, p, max(0, high - want)))
        return out

    def shared() -> Iterator[Metric]:
        yield counter("tally_events", "Input events by outcome (accepted: priced rows; rejected: dead letters)",
                      [({"role": role, "outcome": "accepted"}, stats.events_accepted),
                       ({"role": role, "outcome": "rejected"}, stats.events_rejected)], ("role", "outcome"))
        yield counter("tally_dead_letters", "Lines and messages sent to llm.usage.dlq.v1, by reason code",
                      [({"role": role, "reason": r}, n) for r, n in sorted(stats.dead_letters_by_reason.items())],
                      ("role", "reason"))
        yield counter("tally_messages", "Input messages handled", [({"role": role}, stats.messages)], ("role",))
        if role != "sink":  # a sink prices nothing: it reads no price cards or owners
            yield gauge("tally_reference_ready", "1 once the reference data (price cards, owners) is loaded",
                        [({"role": role}, 1.0 if stats.reference_ready else 0.0)], ("role",))
        yield gauge("tally_consumer_lag_messages", "Input messages not yet handled, per owned partition (high "
                    "watermark minus the stage's next offset)",
                    [({"topic": t, "stage": s, "partition": str(p)}, float(n)) for t, s, p, n in lags()],
                    ("topic", "stage", "partition"))
        yield gauge("tally_event_loop_silent_seconds", "Seconds since the event loop's one-second heartbeat beat",
                    [({"role": role}, ctx.heartbeat.silent_for())], ("role",))
        yield gauge("tally_start_time_seconds", "When the worker started (Unix time)",
                    [({"role": role}, stats.started_at)], ("role",))

    metrics.add(shared)

    def rebalancing() -> Check:
        busy = bool(getattr(app, "rebalancing", False))
        try:
            assigned = len(app.consumer.assignment())
        except Exception:  # the consumer is not started yet: not ready, not an error page
            return Check("partitions_assigned", False, "the consumer is starting")
        return Check("partitions_assigned", not busy, "rebalancing" if busy else f"{assigned} partitions assigned")

    def reference() -> Check:
        return Check("reference_data", stats.reference_ready,
                     "loaded" if stats.reference_ready else "the reference topics are still being read")

    ctx.ready[:0] = [rebalancing] if role == "sink" else [reference, rebalancing]
    if role in ("sink", "all"):
        def caught_up() -> Check:
            behind = sum(n for t, s, _, n in lags() if s == "sink")
            return Check("sink_caught_up", behind <= settings.ready_max_lag,
                         f"{behind} messages behind (ready at ≤ {settings.ready_max_lag})")
        ctx.ready.append(caught_up)

    def liveness() -> list[Check]:
        silent = ctx.heartbeat.silent_for()
        return [Check("event_loop", silent < settings.live_stall_s,
                      f"heartbeat {silent:.1f} s ago (dead after {settings.live_stall_s:.0f} s)")]

    def respond(web: Any, status: int, body: dict[str, Any]) -> Response:
        return web.bytes(orjson.dumps(body), content_type="application/json", status=status)  # type: ignore[no-any-return]

    @app.page("/livez")
    class LiveView(View):
        """200 while the event loop beats; 503 once it has been silent for live_stall_s."""

        async def get(self, request: Request) -> Response:
            return respond(self, *verdict(liveness()))

    @app.page("/readyz")
    class ReadyView(View):
        """200 when reference data is loaded, the group settled and (a sink) caught up; 503 with the failing check."""

        async def get(self, request: Request) -> Response:
            return respond(self, *verdict(check() for check in ctx.ready))

    @app.page("/metrics")
    class MetricsView(View):
        """Prometheus text exposition of this worker's metrics."""

        async def get(self, request: Request) -> Response:
            if not authorized(request, settings):
                return respond(self, 401, UNAUTHORIZED)
            body, content_type = metrics.exposition()
            # aiohttp refuses a charset inside content_type; the exposition format is UTF-8 text.
            return self.bytes(body, content_type=content_type.split(";")[0], status=200)  # type: ignore[no-any-return]

