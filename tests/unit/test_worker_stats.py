"""/api/status serves the counters its worker's role moves: a sink shows no process-role counter as a zero."""

from dataclasses import fields

from streams.roles.context import WorkerStats

PROCESS_ONLY = {"events_accepted", "requests_emitted", "fold_state_writes", "detect_requests", "detect_errors",
                "anomaly_alerts", "detect_snapshots", "detect_late", "detect_duplicates"}


def test_a_sink_serves_its_own_counters_and_role_all_and_process_serve_every_one():
    every = {f.name for f in fields(WorkerStats)}
    assert set(WorkerStats("sink").served()) == every - PROCESS_ONLY
    assert {"messages", "events_rejected", "budget_alerts", "role"} <= set(WorkerStats("sink").served())
    for role in ("all", "process"):
        stats = WorkerStats(role, events_accepted=7)
        assert set(stats.served()) == every and stats.served()["events_accepted"] == 7
