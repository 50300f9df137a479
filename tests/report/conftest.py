"""Headless Chromium for the report tests: open a page over the DevTools protocol, collect what went wrong.

Chromium is driven through ``--remote-debugging-pipe`` (JSON messages, NUL-terminated, on fds 3 and 4):
no port, no websocket library. ``open_page`` enables the Runtime, Log, Network and Page domains *before*
navigating, so console errors, uncaught exceptions, failed loads and every request of the page load are
seen, then evaluates an expression in the loaded page and returns all of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
TIMEOUT_S = 60.0


def chromium_binary() -> str:
    """The Chromium to use; skips the test when there is none, except in CI where it must be there."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (scripts/debian-packages.txt lists it)")
        pytest.skip("chromium is not installed")
    return path


@dataclass
class PageVisit:
    """What happened while a page loaded."""

    errors: list[str] = field(default_factory=list)
    """Console errors, uncaught exceptions and error log entries (failed loads among them)."""
    requests: list[str] = field(default_factory=list)
    """URL of every request the page made."""
    value: Any = None
    """The value of the expression evaluated once the page had loaded."""


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, read_fd: int) -> None:
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self.read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def read(self, deadline: float | None = None) -> dict[str, Any]:
        deadline = deadline or time.monotonic() + TIMEOUT_S
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from chromium in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise AssertionError(f"chromium closed the pipe (exit {self.proc.poll()})")
                self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        message: dict[str, Any] = json.loads(raw)
        return message

    def wait_for(self, method: str, timeout_s: float) -> None:
        if any(e.get("method") == method for e in self.events):
            return
        deadline = time.monotonic() + timeout_s
        while True:
            ev = self.read(deadline)
            self.events.append(ev)
            if ev.get("method") == method:
                return

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                self.events.append(self.read(deadline))
            except TimeoutError:
                return


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for ev in events:
        method, p = ev.get("method"), ev.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            out.append("exception: " + str(d.get("exception", {}).get("description", d.get("text"))))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
    return out


def open_page(url: str, expression: str, profile_dir: Path) -> PageVisit:
    """Load ``url`` in headless Chromium; return its errors, its requests and ``expression`` evaluated in it."""
    binary = chromium_binary()
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def wire_fds() -> None:  # in the child: Chromium reads commands on fd 3 and writes replies on fd 4
        r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.dup2(r, 3)
        os.dup2(w, 4)

    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-pipe", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(3, 4),
        preexec_fn=wire_fds,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    visit = PageVisit()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.events.clear()  # whatever about:blank did is not the page's doing
        pipe.send("Page.navigate", {"url": url}, session=session)
        pipe.wait_for("Page.loadEventFired", TIMEOUT_S)
        pipe.drain(0.5)  # late errors (images decoding, deferred work)
        result = pipe.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"the check itself failed: {result['exceptionDetails']}")
        visit.value = result["result"].get("value")
        visit.errors = _errors(pipe.events)
        visit.requests = [
            e["params"]["request"]["url"] for e in pipe.events if e.get("method") == "Network.requestWillBeSent"
        ]
        with contextlib.suppress(AssertionError):  # the pipe closes as the browser goes
            pipe.send("Browser.close")
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return visit


def screenshot(url: str, out: Path, profile_dir: Path) -> Path:
    """Save a 1280×4000 screenshot of ``url`` with Chromium's own ``--screenshot``."""
    binary = chromium_binary()
    subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--screenshot={out}",
         "--window-size=1280,4000", "--hide-scrollbars", url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=TIMEOUT_S,
        check=True,
    )
    return out


class Chromium:
    """What the ``chromium`` fixture gives a test: a page opener and a screenshotter with their own profiles."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.binary = chromium_binary()
        self._profiles = 0

    def _profile(self) -> Path:
        self._profiles += 1
        return self.tmp_path / f"chromium-profile-{self._profiles}"

    def open_page(self, url: str, expression: str = "null") -> PageVisit:
        return open_page(url, expression, self._profile())

    def screenshot(self, url: str, out: Path) -> Path:
        return screenshot(url, out, self._profile())


@pytest.fixture
def chromium(tmp_path: Path) -> Chromium:
    """Headless Chromium (skipped where it is not installed, except in CI)."""
    return Chromium(tmp_path)
