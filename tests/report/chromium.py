"""Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands on
fd 3, replies on fd 4, NUL-separated JSON), so no websocket library and no network port are needed.

``render(page)`` opens a file, waits for its load event and every image's decode, and returns what the
browser laid out (each h2 and its section, each image's natural and displayed size) and a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
# Runs in the page after load: every image decoded, then the layout of sections and images.
LAYOUT_SCRIPT = """
(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  const shown = el => {
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return box.width > 0 && box.height > 0 && style.display !== 'none' && style.visibility !== 'hidden'
      && parseFloat(style.opacity) > 0;
  };
  const sectionOf = el => {
    const s = el.closest('section'), h = s && s.querySelector('h2');
    return h ? h.id : '';
  };
  return {
    title: document.title,
    width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight,
    sections: Array.from(document.querySelectorAll('h2')).map(h => ({
      id: h.id, title: h.textContent, shown: shown(h),
      height: h.closest('section') ? h.closest('section').getBoundingClientRect().height : 0})),
    images: images.map(img => ({
      alt: img.alt, section: sectionOf(img), complete: img.complete, shown: shown(img),
      naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
      width: img.getBoundingClientRect().width, height: img.getBoundingClientRect().height})),
  };
})()
"""


def find_chromium() -> str | None:
    """The browser binary: ``$MEDSSL_CHROMIUM`` when set (a path; empty means none), else the first found."""
    if "MEDSSL_CHROMIUM" in os.environ:
        chosen = os.environ["MEDSSL_CHROMIUM"]
        return chosen if chosen and shutil.which(chosen) else None
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, timeout: float) -> None:
        self.write_fd, self.read_fd, self.timeout = write_fd, read_fd, timeout
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _message(self) -> dict:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: str | None = None, **params: Any) -> dict:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str) -> dict:
        while True:
            for index, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(index)
            self.events.append(self._message())


def render(page: Path, width: int = 1200, timeout: float = 60.0, screenshot_scale: float = 1.0) -> tuple[dict, bytes]:
    """Load ``page`` in headless Chromium; return (layout from ``LAYOUT_SCRIPT``, full-page PNG bytes)."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("chromium not found")
    profile = tempfile.mkdtemp(prefix="medssl-chromium-")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def child_fds() -> None:  # the pipe protocol's fixed descriptors in the child
        high_r, high_w = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    process = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=child_fds,
        close_fds=False,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    pipe = _Pipe(to_browser_w, from_browser_r, timeout)
    try:
        target = pipe.send("Target.createTarget", url="about:blank")["targetId"]
        session = pipe.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        pipe.send("Page.enable", session)
        pipe.send(
            "Emulation.setDeviceMetricsOverride", session, width=width, height=900, deviceScaleFactor=1, mobile=False
        )
        pipe.send("Page.navigate", session, url=page.resolve().as_uri())
        pipe.wait_event("Page.loadEventFired")
        result = pipe.send("Runtime.evaluate", session, expression=LAYOUT_SCRIPT, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"layout script failed: {result['exceptionDetails']}")
        layout = result["result"]["value"]
        clip = {"x": 0, "y": 0, "width": layout["width"], "height": layout["height"], "scale": screenshot_scale}
        shot = pipe.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True, clip=clip)
        with contextlib.suppress(RuntimeError, OSError):  # the pipe may close as the browser exits
            pipe.send("Browser.close")
        return layout, base64.b64decode(shot["data"])
    finally:
        os.close(to_browser_w)
        os.close(from_browser_r)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)
