"""The renderer every report uses: one Report, as rich tables, CSV, JSON or one self-contained HTML file."""

from __future__ import annotations

import csv
import html
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_UP, Decimal
from io import StringIO
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from tally.errors import ReportError

Format = Literal["table", "csv", "json", "html"]
FORMATS: tuple[str, ...] = ("table", "csv", "json", "html")
# Width of the terminal rendering when the output is not a terminal (a file, a pipe): wide tables stay on one line.
FILE_WIDTH = 200
# Money is what a `usd` name labels (cost_usd, sum(cost_total_usd), usd_per_min): a column, or the measure of a
# (measure, value) table. Tables for people (terminal, HTML) show it to the cent; CSV and JSON exactly.
_MONEY_NAME = re.compile(r"(^|[^a-z0-9])usd($|[^a-z0-9])", re.IGNORECASE)
_CENT = Decimal("0.01")
ROUNDED_NOTE = "Money is shown to the cent here; --format csv or json gives the exact amounts."


@dataclass(frozen=True)
class Chart:
    """A chart of one table: `x` names a column (categories in row order), `y` numeric columns (one series each)."""

    kind: Literal["bar", "stacked_bar", "line"]
    x: str
    y: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """One table of a report; `name` is its machine name (`--table`, the JSON key).

    Cells: Decimal for money (rendered exactly in every format), int, float (estimates only), str, date, datetime,
    None (empty).
    """

    name: str
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    chart: Chart | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """A report: its title, a subtitle (period, data source, generated-at), tables and notes."""

    title: str
    subtitle: str
    tables: tuple[Table, ...]
    notes: tuple[str, ...] = ()


def decimal_text(value: Decimal) -> str:
    """The exact value in plain notation (never an exponent, never rounded), trailing fractional zeros removed."""
    return _trim(format(value, "f"))


def display_decimal(value: Decimal) -> str:
    """The exact value for people: thousands separators and at least two decimals (1234.5 → 1,234.50)."""
    whole, _, frac = _trim(format(value, ",f")).partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def is_money(name: str) -> bool:
    """Whether a column (or a measure) of this name holds money: its name says USD."""
    return bool(_MONEY_NAME.search(name))


def money_text(value: Decimal) -> str:
    """Money for people: to the cent (half up), with thousands separators (14.1710897225 → 14.17)."""
    cents = value.quantize(_CENT, rounding=ROUND_HALF_UP)
    return f"{cents + 0:,.2f}"  # + 0 turns -0.00 into 0.00


def hides_digits(value: Any) -> bool:
    """Whether money_text would drop digits of this cell (a Decimal finer than the cent)."""
    return isinstance(value, Decimal) and value != value.quantize(_CENT, rounding=ROUND_HALF_UP)


def _trim(text: str) -> str:
    """Drop trailing fractional zeros (and a bare point) of a plain-notation number; "-0" becomes "0"."""
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def cell_text(value: Any) -> str:
    """A cell as CSV writes it: Decimal exact, dates and datetimes ISO 8601, None empty, floats round-trip."""
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return str(value)


def display_text(value: Any, money: bool = False) -> str:
    """A cell as people read it (terminal, HTML): money to the cent, other Decimals exact; floats to 6 digits."""
    if isinstance(value, Decimal):
        return money_text(value) if money else display_decimal(value)
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    if isinstance(value, datetime):
        text = f"{value:%Y-%m-%d %H:%M:%S}" + (f".{value.microsecond // 1000:03d}" if value.microsecond else "")
        offset = value.utcoffset()
        return text if offset is None else text + (" UTC" if not offset else f"{value:%z}")
    return cell_text(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, Decimal | int | float) and not isinstance(value, bool)


def _numeric_columns(table: Table) -> list[bool]:
    """Columns whose non-empty cells are all numbers (right-aligned)."""
    flags = []
    for i in range(len(table.columns)):
        cells = [r[i] for r in table.rows if r[i] is not None]
        flags.append(bool(cells) and all(_is_number(c) for c in cells))
    return flags


def money_cells(table: Table) -> list[list[bool]]:
    """Per row, per column: whether the cell is money (a `usd` column, or the value of a `usd` measure)."""
    columns = [is_money(c) for c in table.columns]
    measures = table.columns[:2] == ("measure", "value")
    return [[money or (measures and i == 1 and is_money(str(r[0]))) for i, money in enumerate(columns)]
            for r in table.rows]


def _rounded(tables: Sequence[Table]) -> bool:
    """Whether showing money to the cent hides digits of any cell of these tables."""
    return any(flag and hides_digits(v) for t in tables for r, flags in zip(t.rows, money_cells(t), strict=True)
               for v, flag in zip(r, flags, strict=True))


def _select(report: Report, name: str | None) -> tuple[Table, ...]:
    if name is None:
        return report.tables
    for t in report.tables:
        if t.name == name:
            return (t,)
    known = ", ".join(t.name for t in report.tables) or "none"
    raise ReportError(f"the report has no table named {name!r}; its tables: {known}")


def render(report: Report, fmt: Format, out: IO[str], table: str | None = None) -> None:
    """Write the report to `out` in `fmt`; `table` names the one table to write (csv: default the first).

    Raises ReportError for an unknown table name or format; nothing is written then.
    """
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    tables = _select(report, table)
    for t in tables:
        if any(len(r) != len(t.columns) for r in t.rows):
            raise ReportError(f"table {t.name}: a row does not have {len(t.columns)} cells")
    if fmt == "csv":
        if not tables:
            raise ReportError("the report has no table to write as CSV")
        _render_csv(tables[0], out)
    elif fmt == "json":
        _render_json(report, tables, out)
    elif fmt == "html":
        out.write(_html(report, tables))
    else:
        _render_terminal(report, tables, out)


@dataclass(frozen=True)
class Destination:
    """Where and how a report goes: the `tally report` group's --format, --output (None = stdout) and --table."""

    fmt: Format = "table"
    output: Path | None = None
    table: str | None = None

    @property
    def shows_progress(self) -> bool:
        return progress_enabled(self.fmt, to_stdout=self.output is None)


def write_report(report: Report, dest: Destination, stdout: IO[str]) -> None:
    """Render to `stdout`, or in memory and then to dest.output: a failed render leaves no partial file."""
    if dest.output is None:
        render(report, dest.fmt, stdout, dest.table)
        return
    buf = StringIO()
    render(report, dest.fmt, buf, dest.table)
    try:
        dest.output.write_text(buf.getvalue(), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {dest.output}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- csv, json, terminal
def _render_csv(t: Table, out: IO[str]) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(t.columns)
    w.writerows([cell_text(v) for v in r] for r in t.rows)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return decimal_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _render_json(report: Report, tables: Sequence[Table], out: IO[str]) -> None:
    doc = {
        "title": report.title, "subtitle": report.subtitle, "notes": list(report.notes),
        "tables": {t.name: {"title": t.title, "notes": list(t.notes), "columns": list(t.columns),
                            "rows": [{c: _json_value(v) for c, v in zip(t.columns, r, strict=True)} for r in t.rows]}
                   for t in tables},
    }
    out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _render_terminal(report: Report, tables: Sequence[Table], out: IO[str]) -> None:
    tty = out.isatty()
    console = Console(file=out, width=None if tty else FILE_WIDTH, force_terminal=tty, highlight=False,
                      soft_wrap=False)
    console.print(f"[bold]{_markup_escape(report.title)}[/]")
    console.print(_markup_escape(report.subtitle), style="dim")
    for t in tables:
        console.print()
        numeric = _numeric_columns(t)
        rt = RichTable(title=_markup_escape(t.title), title_justify="left", title_style="bold")
        for col, num in zip(t.columns, numeric, strict=True):
            rt.add_column(_markup_escape(col), justify="right" if num else "left")
        for r, money in zip(t.rows, money_cells(t), strict=True):
            rt.add_row(*(_markup_escape(display_text(v, m)) for v, m in zip(r, money, strict=True)))
        console.print(rt)
        for note in t.notes:
            console.print(_markup_escape(note), style="dim")
    notes = (*report.notes, *((ROUNDED_NOTE,) if _rounded(tables) else ()))
    if notes:
        console.print()
        for note in notes:
            console.print(_markup_escape(note))


def _markup_escape(text: str) -> str:
    return text.replace("[", r"\[")


# ---------------------------------------------------------------- html and svg charts
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
color:#1f2328;padding:0 1rem;line-height:1.4}
h1{margin-bottom:.2rem}h2{margin-top:2.2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
.subtitle{color:#59636e;margin-top:0}.note{color:#59636e;font-size:.9rem;margin:.3rem 0}
nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.88rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.25rem .55rem;vertical-align:top}
th{background:#f6f8fa;text-align:left}td.num{text-align:right;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}.scroll{overflow-x:auto}
.legend{font-size:.85rem;margin:.4rem 0}.legend span{display:inline-block;margin-right:1rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.3rem;vertical-align:-1px}
svg text{font-family:inherit;font-size:11px;fill:#3d444d}
""".strip()


def _html(report: Report, tables: Sequence[Table]) -> str:
    e = html.escape
    parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(report.title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(report.title)}</h1>", f'<p class="subtitle">{e(report.subtitle)}</p>']
    parts += [f'<p class="note">{e(n)}</p>' for n in (*report.notes, *((ROUNDED_NOTE,) if _rounded(tables) else ()))]
    if len(tables) > 1:
        parts.append("<nav>" + "".join(f'<a href="#{e(t.name)}">{e(t.title)}</a>' for t in tables) + "</nav>")
    for t in tables:
        parts.append(f'<section id="{e(t.name)}"><h2>{e(t.title)}</h2>')
        parts += [f'<p class="note">{e(n)}</p>' for n in t.notes]
        if t.chart is not None and t.rows:
            parts.append(_chart_html(t, t.chart))
        numeric = _numeric_columns(t)
        parts.append('<div class="scroll"><table><thead><tr>' + "".join(f"<th>{e(c)}</th>" for c in t.columns)
                     + "</tr></thead><tbody>")
        for r, money in zip(t.rows, money_cells(t), strict=True):
            parts.append("<tr>" + "".join(f'<td class="num">{e(display_text(v, m))}</td>' if num
                                          else f"<td>{e(display_text(v, m))}</td>"
                                          for v, num, m in zip(r, numeric, money, strict=True)) + "</tr>")
        parts.append("</tbody></table></div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _float(value: Any) -> float | None:
    """A cell as a float for chart geometry only (never for a printed figure)."""
    return float(value) if _is_number(value) else None


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * mag >= raw)
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    n = round((end - start) / step)
    return [start + i * step for i in range(n + 1)]


def _tick_label(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:,.4g}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:,.4g}k"
    return f"{v:,.6g}"


def _chart_html(t: Table, chart: Chart) -> str:
    """A chart as inline SVG (no script, no external asset) with an HTML legend; values in <title> tooltips."""
    for name in (chart.x, *chart.y):
        if name not in t.columns:
            raise ReportError(f"table {t.name}: chart column {name!r} is not one of its columns")
    xi = t.columns.index(chart.x)
    yis = [t.columns.index(c) for c in chart.y]
    labels = [display_text(r[xi]) for r in t.rows]
    series = [[_float(r[i]) for r in t.rows] for i in yis]
    if chart.kind == "stacked_bar":
        pos = [sum(v for v in col if v is not None and v > 0) for col in zip(*series, strict=True)]
        neg = [sum(v for v in col if v is not None and v < 0) for col in zip(*series, strict=True)]
        lo, hi = min([0.0, *neg]), max([0.0, *pos])
    else:
        values = [v for s in series for v in s if v is not None]
        lo, hi = min([0.0, *values]), max([0.0, *values])
    ticks = _nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]
    width, height, left, right, top, bottom = 820, 340, 72, 16, 14, 96
    pw, ph = width - left - right, height - top - bottom
    n = len(t.rows)
    slot = pw / n

    def y_of(v: float) -> float:
        return top + ph - (v - lo) / (hi - lo) * ph

    e = html.escape
    svg = [f'<svg viewBox="0 0 {width} {height}" width="100%" style="max-width:{width}px" role="img" '
           f'aria-label="{e(t.title)}"><title>{e(t.title)}</title>']
    for tick in ticks:
        y = y_of(tick)
        svg.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{e(_tick_label(tick))}</text>')
    zero = y_of(0.0)
    svg.append(f'<line x1="{left}" x2="{width - right}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#8c959f"/>')
    every = max(1, math.ceil(n / 40))
    for i, label in enumerate(labels):
        if i % every:
            continue
        x = left + slot * (i + 0.5)
        short = label if len(label) <= 22 else label[:21] + "…"
        svg.append(f'<text x="{x:.1f}" y="{top + ph + 12}" text-anchor="end" '
                   f'transform="rotate(-35 {x:.1f} {top + ph + 12})">{e(short)}</text>')
    if chart.kind == "line":
        for k, s in enumerate(series):
            color = PALETTE[k % len(PALETTE)]
            points: list[tuple[float, float, int]] = [(left + slot * (i + 0.5), y_of(v), i)
                                                      for i, v in enumerate(s) if v is not None]
            segments: list[list[tuple[float, float, int]]] = []
            for point in points:  # an empty cell breaks the line
                if segments and segments[-1][-1][2] == point[2] - 1:
                    segments[-1].append(point)
                else:
                    segments.append([point])
            for seg in (sg for sg in segments if len(sg) > 1):
                path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in seg)
                svg.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
            for x, y, i in points:
                tip = f"{chart.y[k]} at {labels[i]}: {display_text(t.rows[i][yis[k]], is_money(chart.y[k]))}"
                svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{e(tip)}</title></circle>')
    else:
        for i in range(n):
            x0 = left + slot * i + slot * 0.1
            stack_pos, stack_neg = 0.0, 0.0
            for k, s in enumerate(series):
                v = s[i]
                if v is None or v == 0:
                    continue
                color = PALETTE[k % len(PALETTE)]
                if chart.kind == "stacked_bar":
                    base = stack_pos if v > 0 else stack_neg
                    y_a, y_b = y_of(base), y_of(base + v)
                    if v > 0:
                        stack_pos += v
                    else:
                        stack_neg += v
                    bx, bw = x0, slot * 0.8
                else:
                    y_a, y_b = zero, y_of(v)
                    bw = slot * 0.8 / len(series)
                    bx = x0 + k * bw
                tip = f"{labels[i]} · {chart.y[k]}: {display_text(t.rows[i][yis[k]], is_money(chart.y[k]))}"
                svg.append(f'<rect x="{bx:.1f}" y="{min(y_a, y_b):.1f}" width="{max(bw, 0.5):.1f}" '
                           f'height="{max(abs(y_b - y_a), 0.5):.1f}" fill="{color}"><title>{e(tip)}</title></rect>')
    svg.append("</svg>")
    legend = "".join(f'<span><i style="background:{PALETTE[k % len(PALETTE)]}"></i>{e(name)}</span>'
                     for k, name in enumerate(chart.y))
    return f'<figure><div class="legend">{legend}</div>{"".join(svg)}</figure>'


# ---------------------------------------------------------------- progress
def progress_enabled(fmt: str, to_stdout: bool, stream: IO[str] | None = None) -> bool:
    """Whether a report shows progress: only when stderr is a terminal, and not while CSV/JSON go to stdout."""
    err = stream if stream is not None else sys.stderr
    return err.isatty() and not (to_stdout and fmt in ("csv", "json"))


@contextmanager
def progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """Yield `step(label)`: call it as each of `total` steps starts; a transient rich bar on stderr when enabled.

    Disabled, `step` does nothing, so a report calls it unconditionally.
    """
    if not enabled:
        yield lambda label: None
        return
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task(description, total=total, label="")
        started = [False]

        def step(label: str) -> None:
            if started[0]:
                bar.advance(task)
            started[0] = True
            bar.update(task, label=label)

        yield step
        bar.update(task, completed=total)
