"""`make faults`: run the fault scenarios, print one table row each, exit 1 unless every row is exact."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from fractions import Fraction
from pathlib import Path

from tests.faults.harness import Row, Suite, table
from tests.faults.scenarios import FULL, SCENARIOS, SHORT


def run(names: list[str], short: bool, root: Path) -> list[Row]:
    """Run the named scenarios in order on one suite broker; a scenario that raises is a failed row."""
    suite = Suite(root)
    rows: list[Row] = []
    try:
        for name in names:
            started = time.monotonic()
            print(f"{name}: running …", file=sys.stderr, flush=True)
            try:
                row = SCENARIOS[name](suite, SHORT if short else FULL)
            except Exception as exc:  # noqa: BLE001 - reported as a failed row, with its traceback on stderr
                traceback.print_exc()
                row = Row(name, 0, 0, 0, 0, Fraction(0), 0.0, [f"{type(exc).__name__}: {exc}"[:300]])
            rows.append(row)
            print(f"{name}: {'ok' if row.ok else 'FAILED'} in {time.monotonic() - started:.0f} s\n{table([row])}",
                  file=sys.stderr, flush=True)
    finally:
        try:
            suite.close()
        except Exception:  # noqa: BLE001 - the rows are the result; a failed cleanup is reported, not raised
            traceback.print_exc()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make faults", description=__doc__)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios (default: all)")
    parser.add_argument("--short", action="store_true", help="the small volumes of the `make test` version")
    parser.add_argument("--keep", type=Path, default=None, help="keep every scenario's data (logs) under this dir")
    args = parser.parse_args(argv)
    names = [n.strip().upper() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(SCENARIOS)}")
    logging.basicConfig(level=logging.WARNING)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = run(names, args.short, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="tally-faults-") as tmp:
            rows = run(names, args.short, Path(tmp))
    print(table(rows))
    bad = [r.scenario for r in rows if not r.ok]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} scenarios: 0 lost, 0 duplicated, exact"
          + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
