"""The worker's log demotions: routine library messages leave WARNING, everything else is untouched."""

import logging

import pytest

from tally.logs import PRODUCER_BUFFER_FULL, demote_routine_library_logs


@pytest.fixture
def producer_log(caplog):
    """Faust's producer logger with the worker's demotions installed; removed again afterwards."""
    logger = logging.getLogger(PRODUCER_BUFFER_FULL[0])
    before = list(logger.filters)
    demote_routine_library_logs()
    demote_routine_library_logs()  # idempotent
    assert len(logger.filters) == len(before) + 1
    yield logger
    logger.filters[:] = before


def test_producer_buffer_full_is_debug_not_warning(producer_log, caplog):
    caplog.set_level(logging.INFO, logger=producer_log.name)
    producer_log.warning(f"producer buffer full size {1234}")  # exactly as faust.transport.producer logs it
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger=producer_log.name)
    producer_log.warning("producer buffer full size 101")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("DEBUG", "producer buffer full size 101")]


def test_other_messages_keep_their_level(producer_log, caplog):
    caplog.set_level(logging.INFO, logger=producer_log.name)
    producer_log.warning("producer buffer full size 12 and something else")
    producer_log.error("Producer send failed")
    logging.getLogger("faust.transport.consumer").warning("producer buffer full size 5")  # another logger
    assert [(r.name, r.levelname) for r in caplog.records] == [
        (producer_log.name, "WARNING"), (producer_log.name, "ERROR"), ("faust.transport.consumer", "WARNING")]
