"""The live dashboard on the worker's web port: the page, its static files and one JSON endpoint per panel."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.web import Request, Response, View

import tally.dashboard
from streams.auth import UNAUTHORIZED, authorized
from tally.config import Settings
from tally.dashboard.panels import (
    PANELS_BY_ID,
    RANGES,
    FilterError,
    default_range,
    filter_values,
    first_data,
    panel_meta,
    parse_filters,
    run_panel,
)
from tally.errors import StoreError
from tally.store import Store

STATIC_DIR = Path(tally.dashboard.__file__).resolve().parent / "static"
PAGE_PATH = tally.dashboard.PAGE_PATH
REFRESH_S = 5  # how often the page asks for fresh numbers
FILTER_VALUES_TTL_S = 10.0  # the filters' values (teams, environments) are read again at most this often
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".md": "text/markdown; charset=utf-8"}
_NO_STORE = {"Cache-Control": "no-store"}


def static_files(directory: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """Every servable file under `directory` by its relative path: (bytes, content type). Read once, at start."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), _CONTENT_TYPES[p.suffix])
            for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix in _CONTENT_TYPES}


def _json(view: View, payload: Any, status: int = 200) -> Response:
    response: Response = view.bytes(orjson.dumps(payload), content_type="application/json", status=status,
                                    headers=_NO_STORE)
    return response


def register_dashboard(app: faust.App, store: Store, executor: Executor,
                       budget_states: Mapping[str, Mapping[str, Any]], settings: Settings) -> None:
    """Serve the live page and its read-only API on the worker's web port (roles sink and all).

    Routes: GET /dashboard/ (the page), /dashboard/static/<file> (its scripts, styles and the charting library;
    nothing is fetched from elsewhere), /api/panels (layout, filter values, time ranges) and
    /api/panels/<id>?range=…|from=…&to=…&team=…&environment=… (one panel's data; 400 on a bad filter, 404 on an
    unknown panel, 502 when ClickHouse refuses the query). Queries run read-only on `executor`, the single thread
    that owns the ClickHouse client, so they queue behind the sink's inserts and never run beside them.
    `budget_states` is the budget stage's latest state per budget (llm.budget.state.v1), read, never written.
    With an API token in `settings`, /api/panels* answer 401 without it; the page and its static files hold no
    data and are served to anyone (the page sends the token it was opened with: /dashboard/#token=…).
    """
    files = static_files()
    page = files["index.html"][0]
    cached: dict[str, Any] = {"at": float("-inf"), "values": {}, "first": None}

    async def present() -> dict[str, list[str]]:
        """The filters' values and the first minute of data (default_range), re-read at most every TTL."""
        if time.monotonic() - cached["at"] > FILTER_VALUES_TTL_S:
            loop = asyncio.get_running_loop()
            cached["values"] = await loop.run_in_executor(executor, filter_values, store.query, store.db)
            cached["first"] = await loop.run_in_executor(executor, first_data, store.query, store.db,
                                                         datetime.now(UTC))
            cached["at"] = time.monotonic()
        values: dict[str, list[str]] = cached["values"]
        return values

    @app.page("/dashboard", name="dashboard_page_bare")
    class DashboardRedirect(View):
        """The page's canonical address ends with a slash."""

        async def get(self, request: Request) -> Response:
            response: Response = self.bytes(b"", status=308, headers={"Location": PAGE_PATH})
            return response

    @app.page(PAGE_PATH, name="dashboard_page")
    class DashboardPage(View):
        """The live page (HTML); it loads its assets from /dashboard/static/ and its data from /api/panels."""

        async def get(self, request: Request) -> Response:
            response: Response = self.bytes(page, headers={**_NO_STORE, "Content-Type": _CONTENT_TYPES[".html"]})
            return response

    @app.page("/dashboard/static/{path:.+}", name="dashboard_static")
    class DashboardStatic(View):
        """The page's static files, from the set read at start (no path ever reaches the file system)."""

        async def get(self, request: Request, path: str) -> Response:
            found = files.get(path)
            if found is None:
                return _json(self, {"error": f"no static file {path!r}"}, status=404)
            response: Response = self.bytes(found[0], headers={"Content-Type": found[1]})
            return response

    @app.page("/api/panels", name="dashboard_panels")
    class PanelList(View):
        """The panels' layout, the filters' values and the time ranges the page offers."""

        async def get(self, request: Request) -> Response:
            if not authorized(request, settings):
                return _json(self, UNAUTHORIZED, status=401)
            try:
                values = await present()
            except StoreError as exc:
                return _json(self, {"error": str(exc)}, status=502)
            return _json(self, {"panels": panel_meta(), "filters": values, "ranges": list(RANGES),
                                "default_range": default_range(cached["first"], datetime.now(UTC)),
                                "refresh_s": REFRESH_S})

    @app.page("/api/panels/{panel_id}", name="dashboard_panel")
    class PanelData(View):
        """One panel's data for the filters in the query string."""

        async def get(self, request: Request, panel_id: str) -> Response:
            if not authorized(request, settings):
                return _json(self, UNAUTHORIZED, status=401)
            panel = PANELS_BY_ID.get(panel_id)
            if panel is None:
                return _json(self, {"error": f"no panel {panel_id!r}"}, status=404)
            params = {k: v for k, v in request.query.items() if isinstance(v, str)}
            try:
                filters = parse_filters(params, datetime.now(UTC), await present())
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(executor, run_panel, panel, store.query, filters, store.db,
                                                 dict(budget_states))
            except FilterError as exc:
                return _json(self, {"error": str(exc)}, status=400)
            except StoreError as exc:
                return _json(self, {"error": str(exc)}, status=502)
            return _json(self, out)
