"""The fault suite's short version, in `make test`: each scenario's row is 0 lost, 0 duplicated, exact."""

import pytest

from tests.faults.harness import Suite, table
from tests.faults.scenarios import SCENARIOS, SHORT

pytestmark = pytest.mark.e2e

# R2 kills the broker (this session's is shared by every test); R4 and R5 run in `make faults` only, which keeps
# this module under 3 minutes. R1 is left out because it finds a real duplicate: a sink killed inside an insert,
# after usage_events took the block and before its materialized views did, re-plans the batch after the restart
# with other batch boundaries, hence another insert token, and usage_events takes the rows twice (docs/exactly-once.md,
# known failures). It stays in `make faults`, failing, until the sink persists its plan.
IN_MAKE_TEST = ("R3", "R6", "R7", "R9", "R10", "R11")


@pytest.mark.parametrize("name", IN_MAKE_TEST)
def test_a_fault_loses_nothing_and_doubles_nothing(name, kafka_broker, tmp_path):
    suite = Suite(tmp_path, bootstrap=kafka_broker)
    try:
        row = SCENARIOS[name](suite, SHORT)
    finally:
        suite.close()
    assert row.ok, "\n" + table([row])
    assert row.events_in > 0 and row.rows_out > 0
