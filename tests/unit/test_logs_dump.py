"""`kill -USR1` on a worker logs where each asyncio task waits, down the await chain."""

import asyncio
import logging

from tally.logs import dump_tasks, dump_worker


def test_dump_tasks_names_the_innermost_await_of_each_task(caplog):
    async def deepest(event: asyncio.Event) -> None:
        await event.wait()

    async def middle(event: asyncio.Event) -> None:
        await deepest(event)

    async def main() -> None:
        event = asyncio.Event()
        task = asyncio.create_task(middle(event), name="stuck-one")
        await asyncio.sleep(0)
        dump_tasks(asyncio.get_running_loop(), logging.getLogger("test.dump"))
        event.set()
        await task

    with caplog.at_level(logging.WARNING, logger="test.dump"):
        asyncio.run(main())
    text = caplog.text
    assert "--- stuck-one" in text
    chain = text[text.index("--- stuck-one"):]
    assert chain.index(" middle") < chain.index(" deepest") < chain.index(" wait")


def test_dump_worker_logs_the_consumer_state_and_each_partition_position(caplog):
    from types import SimpleNamespace

    tp = SimpleNamespace(topic="llm.cost.attempts.v1", partition=2)

    class Consumer:
        _active_partitions = {"a"}
        _paused_partitions: set[str] = set()
        _buffered_partitions: set[str] = set()
        _read_offset = {"a": 41}
        _sought = SimpleNamespace(sought={"a": 40})
        flow_active = True

        def assignment(self) -> list[object]:
            return [tp]

        async def position(self, _tp: object) -> int:
            return 42

        def highwater(self, _tp: object) -> int:
            return 50

    app = SimpleNamespace(consumer=Consumer(), topics=SimpleNamespace(_topics=[
        SimpleNamespace(topics={"llm.cost.attempts.v1"}, queue=asyncio.Queue())]))

    async def main() -> None:
        dump_worker(app, asyncio.get_running_loop(), logging.getLogger("test.dump"))
        for _ in range(3):
            await asyncio.sleep(0)

    with caplog.at_level(logging.WARNING, logger="test.dump"):
        asyncio.run(main())
    assert "read offsets [('a', 41)]; sought [('a', 40)]; flow active True" in caplog.text
    assert "channels (SIGUSR1): [(['llm.cost.attempts.v1'], 0)]" in caplog.text
    assert "position (SIGUSR1) llm.cost.attempts.v1[2]: 42, highwater 50" in caplog.text
