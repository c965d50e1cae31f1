"""The Grafana dashboard of deploy/grafana/, generated from the panels: `make grafana` (or `--check` in CI)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tally.config import REPO_ROOT
from tally.dashboard.panels import FILTER_COLUMNS, FILTER_SQL, PANELS, Panel

DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "tally.json"
PLUGIN_TYPE = "grafana-clickhouse-datasource"
PLUGIN_VERSION = "4.20.0"  # the version whose macros panels.render mirrors
DATASOURCE_UID = "tally-clickhouse"  # deploy/grafana/provisioning/datasources/tally.yaml
DATASOURCE = {"type": PLUGIN_TYPE, "uid": "${datasource}"}
DASHBOARD_UID = "tally-llm-spend"
DATABASE = "tally"
GRID_COLUMNS = 24
_UNITS = {"usd": "currencyUSD", "usd_per_min": "currencyUSD", "usd_per_hour": "currencyUSD", "pct": "percent",
          "count": "short", "": "none"}
_AXIS = {"usd": "USD", "usd_per_min": "USD per minute", "usd_per_hour": "USD per hour", "pct": "%"}
# sqlds' result formats: 0 = time series (long frames are pivoted to wide), 1 = table.
_FORMAT_TIME_SERIES, _FORMAT_TABLE = 0, 1


def _override(column: str, **properties: Any) -> dict[str, Any]:
    return {"matcher": {"id": "byName", "options": column},
            "properties": [{"id": k.replace("__", "."), "value": v} for k, v in properties.items()]}


def _unit_overrides(panel: Panel) -> list[dict[str, Any]]:
    return [_override(col, unit=_UNITS[unit], **({"decimals": 0} if unit == "count" else {}))
            for col, unit in panel.units.items()]


def _timeseries(panel: Panel) -> dict[str, Any]:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 30 if panel.stacked else 10,
              "showPoints": "never", "spanNulls": False, "axisLabel": _AXIS.get(panel.unit, ""),
              "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"}}
    overrides = [_override(col, custom__stacking={"mode": "none", "group": "apart"}, custom__fillOpacity=0,
                           custom__lineWidth=2, custom__lineStyle={"fill": "dash", "dash": [10, 10]})
                 for col in panel.apart]
    return {"type": "timeseries",
            "fieldConfig": {"defaults": {"unit": _UNITS[panel.unit], "custom": custom}, "overrides": overrides},
            "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def _bar(panel: Panel) -> dict[str, Any]:
    # Numeric columns that are not bars stay in the tooltip only.
    hidden = [_override(col, custom__hideFrom={"viz": True, "legend": True, "tooltip": False})
              for col in panel.units if col not in panel.bars]
    return {"type": "barchart",
            "fieldConfig": {"defaults": {"unit": _UNITS[panel.unit], "custom": {"fillOpacity": 80, "lineWidth": 0}},
                            "overrides": _unit_overrides(panel) + hidden},
            "options": {"orientation": "horizontal", "xField": panel.label_column, "showValue": "auto",
                        "groupWidth": 0.8, "barWidth": 0.9, "legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}}


def _stat(panel: Panel) -> dict[str, Any]:
    return {"type": "stat",
            "fieldConfig": {"defaults": {"unit": _UNITS[panel.unit], "decimals": 2, "color": {"mode": "fixed",
                                                                                               "fixedColor": "blue"}},
                            "overrides": _unit_overrides(panel)},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "textMode": "value_and_name", "colorMode": "none", "graphMode": "none",
                        "justifyMode": "center", "orientation": "vertical"}}


def _table(panel: Panel) -> dict[str, Any]:
    return {"type": "table", "fieldConfig": {"defaults": {"unit": _UNITS[panel.unit]},
                                             "overrides": _unit_overrides(panel)},
            "options": {"showHeader": True, "cellHeight": "sm"}}


_BUILDERS = {"timeseries": _timeseries, "bar": _bar, "stat": _stat, "table": _table, "budget": _table}


def grafana_panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    """One Grafana panel: the plugin's raw-SQL query (the panel's SQL verbatim) and a visualization for its kind."""
    body = _BUILDERS[panel.kind](panel)
    timeseries = panel.kind == "timeseries"
    return {"id": pid, "title": panel.title, "description": panel.description, "datasource": DATASOURCE,
            "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y}, **body,
            "targets": [{"refId": "A", "datasource": DATASOURCE, "editorType": "sql",
                         "format": _FORMAT_TIME_SERIES if timeseries else _FORMAT_TABLE,
                         "queryType": "timeseries" if timeseries else "table",
                         "pluginVersion": PLUGIN_VERSION, "rawSql": panel.sql}]}


def _variables() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"type": "datasource", "name": "datasource", "label": "ClickHouse", "query": PLUGIN_TYPE, "hide": 0,
         "current": {"text": "tally ClickHouse", "value": DATASOURCE_UID}, "refresh": 1, "regex": "",
         "options": []},
        {"type": "constant", "name": "database", "query": DATABASE, "hide": 2,
         "current": {"text": DATABASE, "value": DATABASE}, "options": [], "skipUrlSync": True},
    ]
    for name in FILTER_COLUMNS:
        out.append({"type": "query", "name": name, "label": name.capitalize(), "datasource": DATASOURCE,
                    "query": FILTER_SQL[name], "definition": FILTER_SQL[name], "multi": True, "includeAll": True,
                    "current": {"text": ["All"], "value": ["$__all"]}, "refresh": 2, "sort": 1, "hide": 0,
                    "regex": "", "options": []})
    return out


def dashboard(panels: Sequence[Panel] = PANELS) -> dict[str, Any]:
    """The dashboard JSON: the panels in order, laid out left to right on Grafana's 24-column grid."""
    out, x, y, row_h = [], 0, 0, 0
    for pid, panel in enumerate(panels, start=1):
        if x + panel.width > GRID_COLUMNS:
            x, y, row_h = 0, y + row_h, 0
        out.append(grafana_panel(panel, pid, x, y))
        x, row_h = x + panel.width, max(row_h, panel.height)
    return {
        "uid": DASHBOARD_UID, "title": "tally: LLM spend", "tags": ["tally", "llm", "cost"],
        "description": "Generated from tally/dashboard/panels.py by `make grafana`: edit the panels there, not "
                       "here. The same SQL serves the live page on the worker's web port.",
        "editable": True, "graphTooltip": 1, "liveNow": False, "refresh": "30s", "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"}, "timezone": "utc", "version": 1, "weekStart": "",
        "annotations": {"list": []}, "links": [], "templating": {"list": _variables()}, "panels": out,
    }


def render_json(panels: Sequence[Panel] = PANELS) -> str:
    """The dashboard file's exact text (2-space indent, trailing newline): what is committed."""
    return json.dumps(dashboard(panels), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the dashboard file; with --check, exit 1 if the committed file differs from the panels."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--output", type=Path, default=DASHBOARD_PATH)
    args = parser.parse_args(argv)
    text = render_json()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: run `make grafana`", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(PANELS)} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
