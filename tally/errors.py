"""One small exception hierarchy under a single root."""

from __future__ import annotations

from collections.abc import Sequence


class TallyError(Exception):
    """Root of every error tally raises on purpose."""


class ConfigError(TallyError):
    """Settings are invalid; carries every problem found, not just the first."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ReferenceDataError(TallyError):
    """A reference-data file (price card, owners registry, budgets) is invalid; names file and line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid reference data:\n" + "\n".join(f"  - {p}" for p in self.problems))


class NormalizationError(TallyError, ValueError):
    """A provider usage object cannot be turned into disjoint token classes (inconsistent counts)."""


class PublishError(TallyError):
    """The producer could not deliver a message; raised to the caller, never dropped."""


class ReportError(TallyError):
    """A report cannot be built as asked: bad period, bad rules file, unknown table name."""


class KafkaLocalError(TallyError):
    """The project's local Kafka broker could not be fetched, formatted, started or stopped."""


class StoreError(TallyError):
    """ClickHouse is unreachable, misconfigured or refused a statement."""


class StoreLockedError(StoreError):
    """The chDB data directory is already open in another process."""


class SinkGaveUp(StoreError):
    """The sink exhausted its insert retries; the worker must stop without committing offsets."""


class SinkRefused(StoreError):
    """A batch has rows that must go to the dead-letter topic, and the caller has no route for them."""


class QueryRefused(StoreError):
    """An API query is not one SELECT over tally's tables (tally.query_policy says why), or is too large."""
