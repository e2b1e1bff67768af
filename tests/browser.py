"""Open a local page in a real headless Chromium and report what it rendered, with no Python
dependency: the DevTools protocol over `--remote-debugging-pipe` (commands on the child's
fd 3, replies and events on its fd 4, each message JSON ended by a NUL byte).

`Browser(executable).open(path)` loads the page from file://, waits for its load event,
decodes every <img> (`HTMLImageElement.decode()`, which rejects on an image that cannot be
decoded) and returns each image's alt text, natural size and decoding error, the console
errors and uncaught exceptions, the browser log's errors (a resource that failed to load),
and every URL the page requested.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Without the background-networking flags a browser on a closed network retries its
# update, sync and variations fetches and floods the log; the sandbox needs user
# namespaces a container (or root) may not have.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--remote-debugging-pipe")
TIMEOUT_S = 30.0

# Every <img> decoded (or its failure), in document order: [alt, naturalWidth,
# naturalHeight, error or null].
DECODE_IMAGES = """Promise.all(Array.from(document.images, img =>
    img.decode().then(() => [img.alt, img.naturalWidth, img.naturalHeight, null],
                      e => [img.alt, img.naturalWidth, img.naturalHeight, String(e)])))"""


def find_chromium() -> str | None:
    """The first Chromium or Chrome on PATH (`PCBMERGE_CHROMIUM` names another)."""
    named = os.environ.get("PCBMERGE_CHROMIUM")
    if named:
        return shutil.which(named)
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


@dataclass
class Rendered:
    """What the browser saw of one page."""

    images: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    title: str = ""


class Browser:
    """A headless Chromium on a DevTools pipe, with one page target attached."""

    def __init__(self, executable: str) -> None:
        self._profile = tempfile.mkdtemp(prefix="pcbmerge-chromium-")
        to_child, self._to_browser = os.pipe()
        self._from_browser, from_child = os.pipe()
        # Above the descriptors the child will get (3 and 4), so that the dup2 calls in the
        # child cannot overwrite one another.
        child_in = fcntl.fcntl(to_child, fcntl.F_DUPFD, 10)
        child_out = fcntl.fcntl(from_child, fcntl.F_DUPFD, 10)
        os.close(to_child)
        os.close(from_child)

        def wire() -> None:  # in the child, before exec: dup2'd descriptors are inheritable
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        try:
            self._proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, preexec_fn=wire, close_fds=False)
        finally:
            os.close(child_in)
            os.close(child_out)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self._deadline = time.monotonic() + TIMEOUT_S
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target,
                                      flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    # --- the protocol ---------------------------------------------------------------------

    def _read_message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self._deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"Chromium did not answer within {TIMEOUT_S:g} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise ConnectionError(f"Chromium closed its DevTools pipe (exit code "
                                      f"{self._proc.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send a command (to the attached page if `session`) and return its result; the
        events that arrive meanwhile are kept for `wait_for` and `events`."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read_message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._events.append(reply)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=True, **params)

    def wait_for(self, event: str) -> dict[str, Any]:
        for i, e in enumerate(self._events):
            if e["method"] == event:
                return self._events.pop(i)
        while True:
            e = self._read_message()
            if e.get("method") == event:
                return e
            if "method" in e:
                self._events.append(e)

    def events(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out

    # --- a page ---------------------------------------------------------------------------

    def open(self, path: Path) -> Rendered:
        """Load `path` from file://, decode its images, and collect what went wrong."""
        self._deadline = time.monotonic() + TIMEOUT_S
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.page(f"{domain}.enable")
        self.events()  # (what the blank page said before)
        self.page("Page.navigate", url=path.resolve().as_uri())
        self.wait_for("Page.loadEventFired")
        decoded = self.page("Runtime.evaluate", expression=DECODE_IMAGES, awaitPromise=True,
                            returnByValue=True)
        title = self.page("Runtime.evaluate", expression="document.title",
                          returnByValue=True)["result"].get("value", "")
        out = Rendered(images=[tuple(i) for i in decoded["result"]["value"]], title=title)
        for e in self.events():
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error",
                                                                                "assert"):
                out.console_errors.append(" ".join(str(a.get("value", a.get("description")))
                                                   for a in p.get("args", [])))
            elif e["method"] == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                out.exceptions.append(details.get("exception", {}).get("description")
                                      or details.get("text", ""))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.log_errors.append(f"{p['entry'].get('source')}: {p['entry'].get('text')}"
                                      f" {p['entry'].get('url', '')}".rstrip())
            elif e["method"] == "Network.requestWillBeSent":
                out.requests.append(p["request"]["url"])
        return out

    def close(self) -> None:
        try:
            if self._proc.poll() is None:
                self._deadline = time.monotonic() + 5
                with contextlib.suppress(OSError, TimeoutError, ConnectionError, RuntimeError):
                    self.call("Browser.close")  # a browser that will not close is killed below
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()  # our own child, by its handle
                    self._proc.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
