"""Headless Chromium driven over the DevTools protocol: open MLflow's UI, click as a user would,
read the rendered text, take screenshots. Used by tests/test_study_view.py and
docs/screenshots.py.

Needs Debian's ``chromium`` (``apt-get install chromium``); the websocket client is aiohttp's
(a dependency of mlflow). One page per :class:`Browser`; every wait has a deadline and says what
it waited for when it runs out.
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-port=0"]


def chromium_path() -> str | None:
    """The Chromium executable, or None when it is not installed."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    """One headless Chromium page of ``width`` x ``height`` CSS pixels."""

    def __init__(self, width: int = 1200, height: int = 900) -> None:
        exe = chromium_path()
        if exe is None:
            raise FileNotFoundError("chromium not installed (Debian: apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="geoprime-chromium-"))
        self.proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.loop = asyncio.new_event_loop()
        self._id = 0
        self.ws = self.session = None
        self.loop.run_until_complete(self._connect(self._page_socket()))
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _page_socket(self, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        port_file = self.profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self.proc.returncode}")
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                        pages = [t for t in json.load(r) if t.get("type") == "page"]
                    if pages:
                        return pages[0]["webSocketDebuggerUrl"]
                except OSError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"chromium gave no DevTools page in {timeout} s")

    async def _connect(self, url: str) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(url, max_msg_size=0)

    async def _call(self, method: str, params: dict) -> dict:
        self._id += 1
        await self.ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), timeout=60)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def send(self, method: str, **params) -> dict:
        """One DevTools command; its result."""
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def text(self) -> str:
        """The page's rendered text (what a user reads)."""
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60.0) -> str:
        """Wait until every needle is in the rendered text; the text. TimeoutError names what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed {missing} in {timeout} s; it shows: {text[:1500]!r}")
            time.sleep(0.5)

    def _click_at(self, point: dict) -> None:
        """A real mouse click (press and release of the left button) at ``{"x", "y"}``."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=point["x"], y=point["y"], button="left",
                      clickCount=0 if kind == "mouseMoved" else 1)

    def _find(self, condition: str) -> dict | None:
        """Centre of the innermost visible element whose ``condition(e)`` (a JS expression of ``e``) holds,
        scrolled into view; None when there is none."""
        return self.js(f"""(() => {{
            const all = [...document.querySelectorAll('*')].filter(e => {{ const r = e.getBoundingClientRect();
                return r.width > 0 && r.height > 0 && ({condition}); }});
            const el = all.find(e => ![...e.querySelectorAll('*')].some(c => all.includes(c))) || all[0];
            if (!el) return null;
            el.scrollIntoView({{block: 'center'}});
            const r = el.getBoundingClientRect();
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2}}; }})()""")

    def click_text(self, label: str, timeout: float = 30.0) -> None:
        """Click the innermost visible element whose text is ``label``, with the mouse, as a user does
        (waiting up to ``timeout`` s for it to appear)."""
        deadline = time.monotonic() + timeout
        while True:
            point = self._find(f"e.innerText && e.innerText.trim() === {json.dumps(label)}")
            if point:
                return self._click_at(point)
            if time.monotonic() > deadline:
                raise LookupError(f"no element with the text {label!r} to click in {timeout} s")
            time.sleep(0.5)

    def click_text_until(self, label: str, *needles: str, tries: int = 4, wait: float = 15.0) -> str:
        """Click ``label`` until the page shows every needle (a click that lands while the page is still
        re-rendering is lost, as it would be for a user, who clicks again); the page's text."""
        for attempt in range(tries):
            self.click_text(label)
            try:
                return self.wait_for_text(*needles, timeout=wait)
            except TimeoutError:
                if attempt == tries - 1:
                    raise

    def click_where(self, condition: str, what: str, timeout: float = 30.0) -> None:
        """Click the innermost visible element for which the JS expression ``condition`` (of ``e``) holds;
        ``what`` names it in the error when none appears in ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            point = self._find(condition)
            if point:
                return self._click_at(point)
            if time.monotonic() > deadline:
                raise LookupError(f"no {what} to click in {timeout} s")
            time.sleep(0.5)

    def click_label(self, aria_label: str) -> bool:
        """Click the first visible element with this aria-label; False when there is none."""
        point = self._find(f"e.getAttribute('aria-label') === {json.dumps(aria_label)}")
        if point:
            self._click_at(point)
        return bool(point)

    def screenshot(self, path: Path, full_height: bool = False) -> Path:
        """PNG of the viewport (or, ``full_height``, of the page's whole scroll height) into ``path``."""
        params = {"format": "png"}
        if full_height:
            height = int(self.js("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"))
            width = int(self.js("window.innerWidth"))
            params["clip"] = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.send("Page.captureScreenshot", **params)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        """End the browser and remove its profile."""
        try:
            if self.ws is not None:
                self.loop.run_until_complete(self.ws.close())
            if self.session is not None:
                self.loop.run_until_complete(self.session.close())
        finally:
            self.loop.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
