"""A real browser for the tests: Debian's chromium, driven by Playwright for
Python. Nothing downloads a browser build, and nothing leaves this machine:
every request to a host other than a loopback address is refused by the
browser and recorded (OMERO.web's login page asks GitHub for the latest
OMERO.insight release, for instance), and host names do not resolve."""

from __future__ import annotations

import ipaddress
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 120_000  # a page under a loaded machine; a wait ends at the event, not at the timeout

# What the page is, read in the page itself once it has loaded.
FACTS_JS = """() => ({
    title: document.title,
    h1: (document.querySelector('h1') || {}).textContent || null,
    bodyBackground: getComputedStyle(document.body).backgroundColor,
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src, complete: i.complete,
                                                   width: i.naturalWidth, height: i.naturalHeight})),
    stylesheets: Array.from(document.styleSheets).map(s => {
        let rules = -1;
        try { rules = s.cssRules.length; } catch (e) {}
        return {href: s.href, rules: rules};
    }),
})"""


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if urlsplit(url).scheme in ("data", "blob", "about"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Visit:
    """One page load as the browser saw it: every response, every failure, what rendered."""

    requested: str
    screenshot: Path
    url: str = ""
    status: int | None = None  # the document's
    hops: list[tuple[int, str]] = field(default_factory=list)  # redirects before the document: (status, url)
    responses: list[tuple[int, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # loopback requests that got no response
    outside: list[str] = field(default_factory=list)  # requests to other hosts, refused by the browser
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        return str(self.facts.get("title", "")).strip()

    def problems(self, document_status: int = 200) -> list[str]:
        """Why the page is not whole: a bad status, a request that failed, an image without pixels,
        a stylesheet that did not load."""
        found = []
        if self.status != document_status:
            found.append(f"the document answered {self.status}, not {document_status}")
        found += [f"{status} for {url}" for status, url in self.responses
                  if status >= 400 and url != self.url]
        found += [f"failed: {failure}" for failure in self.failed]
        found += [f"image without pixels: {i['src']}" for i in self.facts.get("images", [])
                  if not i["complete"] or i["width"] == 0 or i["height"] == 0]
        found += [f"stylesheet with no rules: {s['href']}" for s in self.facts.get("stylesheets", [])
                  if s["rules"] <= 0]
        return found

    def explain(self, what: str) -> str:
        """A failure message: what, the page, and where its screenshot is."""
        return f"{what}\n  page {self.requested} -> {self.url} ({self.status})\n  screenshot: {self.screenshot}"

    def assert_whole(self, document_status: int = 200) -> None:
        problems = self.problems(document_status)
        assert not problems, self.explain("the page is not whole:\n    " + "\n    ".join(problems))


class Browser:
    """Chromium, one fresh context (no cache, no cookies) per visit."""

    def __init__(self, browser: Any) -> None:
        self._browser = browser

    def visit(self, url: str, screenshot: Path) -> Visit:
        visit = Visit(requested=url, screenshot=screenshot)
        context = self._browser.new_context(viewport={"width": 1280, "height": 800})
        context.set_default_timeout(TIMEOUT_MS)

        def route(r: Any) -> None:
            if loopback(r.request.url):
                r.continue_()
            else:
                visit.outside.append(r.request.url)
                r.abort("blockedbyclient")

        try:
            context.route("**/*", route)
            page = context.new_page()
            page.on("response", lambda r: visit.responses.append((r.status, r.url)))
            page.on("requestfailed",
                    lambda r: None if not loopback(r.url) else visit.failed.append(f"{r.url}: {r.failure}"))
            response = page.goto(url, wait_until="load", timeout=TIMEOUT_MS)
            # Scripts may still fetch: wait until the network has been quiet for a moment.
            page.wait_for_load_state("networkidle", timeout=TIMEOUT_MS)
            visit.url = page.url
            if response is not None:
                visit.status = response.status
                request = response.request.redirected_from
                while request is not None:
                    hop = request.response()
                    visit.hops.insert(0, (hop.status if hop else 0, request.url))
                    request = request.redirected_from
            visit.facts = page.evaluate(FACTS_JS)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
        return visit


# Per module, not per session: Playwright's sync API runs an event loop in the
# main thread while it is started, and every later test that calls
# asyncio.run() in-process would fail with "cannot be called from a running
# event loop".
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: scripts/bootstrap.sh --tests installs the test extra")
    if not CHROMIUM.exists():
        pytest.fail(f"no {CHROMIUM}: apt-get install chromium (scripts/bootstrap.sh --tests installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            # --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
            # No host name resolves (the rule covers address literals too: loopback is excepted),
            # so a request that slipped past the route in visit() still goes nowhere.
            args=["--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--disable-extensions"],
            timeout=TIMEOUT_MS,
        )
        try:
            yield Browser(chromium)
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def need_nginx() -> None:
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        pytest.fail("nginx is not installed (scripts/bootstrap.sh installs nginx-light)")
