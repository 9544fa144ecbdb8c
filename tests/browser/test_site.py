"""The site as a person sees it: Chromium on a real nginx that includes the
server file omerowebd writes, real OMERO.web behind it. The login page is
whole (every stylesheet, script and image loads, OMERO.web's own styles
apply), a publication's short link ends on its page, and with omerowebd
stopped the browser shows the maintenance page. Each page's screenshot is
kept in the test's temporary directory."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import Daemon, wait_for
from integration.test_nginx_serving import Nginx, answers, site_config

from .conftest import Browser

pytestmark = pytest.mark.omeroweb

# Only OMERO.web's ome.login.css gives the login page's body this colour (#e0e4ea).
LOGIN_BACKGROUND = "rgb(224, 228, 234)"
# Only the maintenance page's own style gives its body this colour (#f4f5f7).
MAINTENANCE_BACKGROUND = "rgb(244, 245, 247)"
PUBLICATION = "/pub/schleicher-et-al-2017"
SHOW = "/webclient/?show=project-27936"


@pytest.fixture
def front(tmp_path: Path, need_nginx: None) -> Iterator[Nginx]:
    """nginx including every *.conf the daemon writes: none at first (an empty glob is fine)."""
    server = Nginx(tmp_path / "nginx", f"include {tmp_path / 'state' / 'nginx'}/*.conf;")
    yield server
    server.stop()


@pytest.mark.parametrize("prefix", ["", "/omero"], ids=["no-prefix", "prefix"])
def test_login_page_whole_a_publication_redirect_and_the_maintenance_page_in_a_browser(
        daemon: Daemon, front: Nginx, browser: Browser, tmp_path: Path, prefix: str) -> None:
    omero = f'prefix = "{prefix}"\nstatic_url = "{prefix}/static/"\n' if prefix else ""
    daemon.save(site_config(daemon, front, omero, textwrap.dedent(f"""\
        [nginx.redirects]
        "{PUBLICATION}" = "{prefix}{SHOW}"
        """)))
    front.start()  # before the daemon: its reload after writing the files brings the site in
    daemon.start()
    site = f"http://127.0.0.1:{front.port}"
    login = f"{prefix}/webclient/login/"
    wait_for(lambda: answers(front.port, login), 60, "the login page through nginx")

    page = browser.visit(site + login, tmp_path / "screenshots" / "login.png")
    page.assert_whole()
    assert page.title == "OMERO.web - Login", page.explain(f"title {page.title!r}")
    static = f"{site}{prefix}/static/"
    sheets = [s["href"] for s in page.facts["stylesheets"]]
    assert any("webgateway/css/ome.login.css" in (href or "") for href in sheets), page.explain(f"stylesheets {sheets}")
    assert all((href or "").startswith(static) for href in sheets), page.explain(f"stylesheets {sheets}")
    assert page.facts["bodyBackground"] == LOGIN_BACKGROUND, page.explain(
        f"OMERO.web's styles are not applied: the body's background is {page.facts['bodyBackground']}")
    images = [i["src"] for i in page.facts["images"]]
    assert len(images) >= 2 and all(src.startswith(static) for src in images), page.explain(f"images {images}")
    scripts = [url for status, url in page.responses if status == 200 and url.split("?")[0].endswith(".js")]
    assert any("jquery" in url for url in scripts), page.explain(f"scripts loaded: {scripts}")

    # A publication's short link: nginx answers it with a redirect; OMERO.web, not signed
    # in, sends the browser on to its login page and keeps the target for after the login.
    page = browser.visit(site + PUBLICATION, tmp_path / "screenshots" / "publication.png")
    page.assert_whole()
    assert page.hops and page.hops[0] == (307, site + PUBLICATION), page.explain(f"redirects {page.hops}")
    assert site + prefix + SHOW in [url for _, url in page.hops[1:]] + [page.url], page.explain(
        f"the redirect did not lead to {prefix}{SHOW}: {page.hops}")
    final = urlsplit(page.url)
    assert final.path == login and parse_qs(final.query).get("url") == [prefix + SHOW], page.explain(
        f"the publication link ended on {page.url}")
    assert page.title == "OMERO.web - Login", page.explain(f"title {page.title!r}")

    assert daemon.stop() == 0
    wait_for(lambda: answers(front.port, login, 502), 60, "nginx to see OMERO.web down")
    page = browser.visit(site + login, tmp_path / "screenshots" / "maintenance.png")
    page.assert_whole(document_status=502)
    assert page.title == "OMERO.web is restarting" and page.facts["h1"] == "OMERO.web is restarting", \
        page.explain(f"not the maintenance page: {page.title!r}")
    assert page.facts["bodyBackground"] == MAINTENANCE_BACKGROUND, page.explain(
        f"the maintenance page's style is not applied: the body's background is {page.facts['bodyBackground']}")
