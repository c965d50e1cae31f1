"""The worker's web API (beside the sink, which owns ClickHouse): /api/query, /api/status and the dashboard."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import orjson
from faust.web import Request, Response, View

from streams.auth import UNAUTHORIZED, authorized
from streams.roles.context import RoleContext
from streams.roles.sink import SinkWiring
from tally.errors import StoreError


def _text(value: Any) -> str:
    if isinstance(value, Decimal):
        text = format(value, "f")  # exact (normalize() would round to the context's 28 digits)
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return "0" if text in ("-0", "") else text
    return str(value)


def json_response(web: Any, payload: Any, status: int = 200) -> Response:
    """`payload` as a JSON response (values JSON does not know, such as datetimes and decimals, as text).

    A Decimal is exact in plain notation without ClickHouse's trailing zeros: 14.1710897225, not
    14.171089722500000000 (Decimal(38, 18) columns).
    """
    body = orjson.dumps(payload, default=_text)
    return web.bytes(body, content_type="application/json", status=status)  # type: ignore[no-any-return]


def wire_web(ctx: RoleContext, sink: SinkWiring, budget_states: dict[str, dict[str, Any]]) -> None:
    """The pages: read-only SQL, the worker's counters, the live dashboard and its panels."""
    app, settings, stats = ctx.app, ctx.settings, ctx.stats
    writer, request_writer = sink.writer, sink.request_writer
    # API queries: their own connections and threads (Store.api_query), never the sink's executor.
    query_slots = asyncio.Semaphore(settings.query_max_concurrent)
    query_executor = ThreadPoolExecutor(max_workers=settings.query_max_concurrent, thread_name_prefix="query")

    @app.page("/api/query")
    class QueryView(View):
        """Read-only SQL (what `tally query` sends): one SELECT over tally's tables, capped, beside the sink.

        400: refused by the allow-list or cut by a limit (the message says which); 401: no valid token;
        429: `query_max_concurrent` queries already run.
        """

        async def post(self, request: Request) -> Response:
            if not authorized(request, settings):
                return json_response(self, UNAUTHORIZED, status=401)
            body = await request.json()
            sql = body.get("sql") if isinstance(body, dict) else None
            if not isinstance(sql, str) or not sql.strip():
                return json_response(self, {"error": "POST {\"sql\": \"SELECT …\"}"}, status=400)
            if query_slots.locked():
                return json_response(self, {"error": f"{settings.query_max_concurrent} queries already run; "
                                                     "try again later"}, status=429)
            loop = asyncio.get_running_loop()
            async with query_slots:
                try:
                    res = await loop.run_in_executor(query_executor, writer.store.api_query, sql)
                except StoreError as exc:
                    return json_response(self, {"error": str(exc)}, status=400)
            return json_response(self, {"columns": res.columns, "rows": res.rows})

    @app.page("/api/status")
    class StatusView(View):
        """Worker counters as JSON."""

        async def get(self, request: Request) -> Response:
            if not authorized(request, settings):
                return json_response(self, UNAUTHORIZED, status=401)
            rows = writer.stats  # only sink and all roles serve the web API
            return json_response(self, {**stats.served(), "sink_rows_inserted": rows.rows_inserted,
                                        "sink_duplicates_skipped": rows.duplicates_in_batch + rows.already_saved,
                                        "sink_retries": rows.retries,
                                        "sink_conflicting_duplicates": rows.conflicting_duplicates,
                                        "sink_rows_superseded": rows.superseded,
                                        "sink_request_rows_inserted": request_writer.stats.rows_inserted,
                                        "sink_request_revisions_skipped": request_writer.stats.already_saved,
                                        "pid": os.getpid(),
                                        "uptime_s": round(time.time() - stats.started_at, 1)})

    from streams.dashboard import register_dashboard  # the live page: /dashboard/ and /api/panels
    register_dashboard(app, writer.store, sink.executor, budget_states, settings)
