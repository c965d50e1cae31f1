"""A headless Chromium driven over the DevTools protocol (one page), for the live dashboard's browser test."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH (Debian's package installs `chromium`)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(AssertionError):
    """The browser failed, a script threw, or a condition was not met in time."""


class Chromium:
    """One headless Chromium process and one page, driven synchronously from a test.

    Started with its own profile directory and a DevTools port it picks itself (read back from the profile's
    DevToolsActivePort file), so parallel runs never collide. `close()` ends the process.
    """

    def __init__(self, executable: str, profile: Path, width: int = 1440, height: int = 1000) -> None:
        self.width, self.height = width, height
        self.profile = profile
        self.loop = asyncio.new_event_loop()
        self._ids = itertools.count(1)
        args = [executable, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--remote-debugging-port=0", "--remote-allow-origins=*",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.loop.run_until_complete(self._connect())
        except BaseException:
            self.close()
            raise

    async def _connect(self, timeout: float = 60.0) -> None:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (active.exists() and active.read_text().strip()):
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}: "
                                   f"{(self.proc.stderr.read() if self.proc.stderr else b'').decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port in time")
            await asyncio.sleep(0.1)
        port = int(active.read_text().split()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        await self._call("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    async def _call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
        ident = next(self._ids)
        await self.ws.send_str(orjson.dumps({"id": ident, "method": method, "params": params or {}}).decode())
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    raise BrowserError(f"DevTools connection closed: {msg.type}")
                data = orjson.loads(msg.data)
                if data.get("id") == ident:  # anything else is an event nobody subscribed to
                    if "error" in data:
                        raise BrowserError(f"{method}: {data['error']}")
                    return data.get("result", {})

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.loop.run_until_complete(self._call(method, params))

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"cannot load {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); a thrown error raises."""
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, describe: str = "") -> Any:
        """Poll `expression` until it is truthy; on the deadline raise with `describe` (a JS expression) evaluated."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.evaluate(describe) if describe else value
                raise BrowserError(f"not true within {timeout:.0f}s: {expression}\nstate: {state}")
            time.sleep(0.25)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (the viewport grown to the page's height)."""
        height = int(self.evaluate("Math.ceil(document.documentElement.scrollHeight)") or self.height)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        time.sleep(0.5)  # let the charts lay themselves out at the new size before the capture
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(shot["data"]))
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        return path

    def close(self) -> None:
        async def _close() -> None:
            if getattr(self, "ws", None) is not None:
                await self.ws.close()
            if getattr(self, "session", None) is not None:
                await self.session.close()

        try:
            self.loop.run_until_complete(_close())
        finally:
            self.loop.close()
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
