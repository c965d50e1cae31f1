"""`kill -USR1` on a worker logs where each asyncio task waits, down the await chain."""

import asyncio
import logging

from tally.logs import dump_tasks


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
