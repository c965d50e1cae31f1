"""Each worker role's wiring in a module of its own; streams.app.create_app composes them by role.

- context: what every role shares (the app, settings, store, counters, topics, stored positions) and its helpers
- process: llm.usage.v1 → validate, enrich, fold → attempts, requests, dead letters; the fold timer and watermarks
- detect: llm.cost.requests.v1 → per-feature detectors → anomaly alerts; their snapshots and positions
- sink: attempts, requests and alerts → ClickHouse, each row once
- budget: spend to date against budgets → llm.budget.state.v1 and budget alerts (beside the sink: it reads ClickHouse)
- web: /api/query, /api/status and the dashboard (beside the sink: they read ClickHouse)
"""
