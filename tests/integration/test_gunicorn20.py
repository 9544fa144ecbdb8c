"""The core scenarios again, on gunicorn 20.1: Debian 12's, the oldest supported.

The tests are the same functions as in test_daemon and test_reload; only the
``daemon`` fixture differs (an OMERO.web venv with gunicorn 20.1.0, built by
scripts/bootstrap.sh from scripts/omero-web-requirements-gunicorn20.txt).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import Daemon, free_port

from integration.test_daemon import (  # noqa: F401  (collected here, with this module's fixture)
    test_killed_master_is_replaced_without_refusing_connections,
    test_ready_only_once_the_login_page_answers,
    test_sigkill_of_the_daemon_leaves_no_gunicorn,
    test_socket_activation,
)
from integration.test_reload import (  # noqa: F401
    apps,
    test_a_generation_that_fails_is_rolled_back,
    test_reloads_under_load_lose_no_request,
)

pytestmark = pytest.mark.omeroweb

VENV20 = Path(os.environ.get("OMEROWEBD_TEST_VENV_GUNICORN20", "/opt/omero/web/venv-gunicorn20"))


@pytest.fixture
def daemon(tmp_path, notify):
    if not (VENV20 / "bin" / "python").exists():
        pytest.skip(f"no gunicorn 20.1 OMERO.web venv at {VENV20} (scripts/bootstrap.sh builds it)")
    d = Daemon(root=tmp_path, venv=VENV20, port=free_port(), notify=notify)
    yield d
    d.cleanup()


def test_this_venv_has_gunicorn_20_1(daemon):
    daemon.write_config(workers=1)
    daemon.start()
    assert daemon.status()["versions"]["gunicorn"] == "20.1.0"
