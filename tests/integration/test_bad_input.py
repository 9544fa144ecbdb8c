"""Bad input gets one clear line and a non-zero exit, never a traceback (issue 2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import Daemon, free_port, http_get, wait_for

from omerowebd import config as config_module
from omerowebd.supervisor import Supervisor
from omerowebd.systemd import Notifier

pytestmark = pytest.mark.omeroweb


def run_daemon(config: Path | None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "omerowebd"] + (["--config", str(config)] if config else [])
    full_env = {k: v for k, v in os.environ.items() if k != "OMEROWEBD_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def write(tmp_path: Path, body: str, *, venv: Path, port: int | None = None, omerodir: Path | None = None) -> Path:
    path = tmp_path / "omerowebd.toml"
    path.write_text(textwrap.dedent(f"""\
        [daemon]
        omerodir = "{omerodir or tmp_path / 'omerodir'}"
        venv = "{venv}"
        runtime_dir = "{tmp_path / 'run'}"
        state_dir = "{tmp_path / 'state'}"
        bind = ["127.0.0.1:{port or free_port()}"]
        """) + textwrap.dedent(body))
    return path


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("omerowebd: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_missing_config(tmp_path):
    result = run_daemon(tmp_path / "nope.toml")
    assert_one_line(result, 78, "nope.toml", "not found")


def test_default_config_path_comes_from_the_environment(tmp_path):
    result = run_daemon(None, env={"OMEROWEBD_CONFIG": str(tmp_path / "env.toml")})
    assert_one_line(result, 78, "env.toml", "not found")


def test_unreadable_config(tmp_path, omero_venv):
    path = write(tmp_path, "", venv=omero_venv)
    path.chmod(0)
    result = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-m", "omerowebd", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    tmp_path.chmod(0o755)
    assert_one_line(result, 78, "cannot read")


def test_toml_syntax_error_has_line_and_column(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nprefix = /omero\n", venv=omero_venv)
    line = assert_one_line(run_daemon(path), 78, "TOML syntax error")
    assert f"{path}:8:10:" in line  # the "/" of "prefix = /omero"


def test_wrong_type_of_daemon_setting(tmp_path, omero_venv):
    path = write(tmp_path, "ready_timeout = \"soon\"\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, f"{path}:7:", "daemon.ready_timeout", "must be a number")


def test_unknown_key_suggests_the_right_one(tmp_path, omero_venv):
    path = write(tmp_path, "ready_timout = 10\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, "unknown key daemon.ready_timout", "did you mean 'ready_timeout'")


def test_wrong_type_of_omero_property(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_workers = \"many\"\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, f"{path}:8:", "omero.web.wsgi_workers", "must be an integer")


def test_unknown_omero_property_is_a_warning_with_a_suggestion(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_worker = 2\n", venv=omero_venv)
    out = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    assert "warning:" in out.stdout and "did you mean 'omero.web.wsgi_workers'" in out.stdout


def test_venv_without_omero_web(tmp_path):
    fake = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fake)], check=True)
    path = write(tmp_path, "", venv=fake)
    result = run_daemon(path)
    assert result.returncode == 78 and "Traceback" not in result.stderr
    assert "has no omero-web: run" in result.stderr and "has no gunicorn: run" in result.stderr


def test_venv_that_does_not_exist(tmp_path):
    path = write(tmp_path, "", venv=tmp_path / "missing")
    assert_one_line(run_daemon(path), 78, "does not exist", "daemon.venv")


def test_omerodir_that_cannot_be_written(tmp_path, omero_venv):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = write(tmp_path, "", venv=omero_venv, omerodir=blocker / "omerodir")
    assert_one_line(run_daemon(path), 78, "daemon.omerodir", "is not a directory")


def test_address_already_in_use(tmp_path, omero_venv):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        path = write(tmp_path, "", venv=omero_venv, port=taken.getsockname()[1])
        assert_one_line(run_daemon(path), 78, "address already in use")


def test_check_lists_every_problem_and_starts_nothing(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_workers = \"x\"\ndebug = \"maybe\"\n", venv=omero_venv)
    out = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(path)], capture_output=True, text=True)
    assert out.returncode == 1
    errors = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "wsgi_workers" in out.stdout and "debug" in out.stdout
    assert not (tmp_path / "run").exists()


# -- issue 10: what gunicorn, nginx or omero web would refuse later -----------------------


def check(path: Path) -> tuple[int, list[str]]:
    out = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "check", str(path)], capture_output=True, text=True,
                         timeout=180)
    assert "Traceback" not in out.stdout + out.stderr, out.stderr
    return out.returncode, [line for line in out.stdout.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("body, where, needle", [
    ('[omero.web]\nwsgi_args = "--access-logformat \'%(h)s"\n', 8, "omero.web.wsgi_args cannot be split"),
    ("[omero.web]\nwsgi_workers = 0\n", 8, "omero.web.wsgi_workers must be at least 1, not 0"),
    ("[omero.web]\nwsgi_threads = -2\n", 8, "omero.web.wsgi_threads must be at least 1, not -2"),
    ("[omero.web]\nwsgi_timeout = -1\n", 8, "omero.web.wsgi_timeout must be at least 0"),
    ("[omero.web]\n\"application_server.max_requests\" = -5\n", 8, "max_requests must be at least 0"),
    ('[omero.web]\nwsgi_worker_class = "eventlet"\n', 8, "must be one of 'sync', 'gevent'"),
    ('[omero.web]\nwsgi_args = "--workers 9"\n', 8, "sets --workers, which omerowebd sets itself"),
    ('[nginx]\nlisten = "0"\n', 8, "nginx.listen has '0': the port must be a number from 1 to 65535"),
    ('[nginx]\nlisten = "8080 ssl_on"\n', 8, "'ssl_on' is not a parameter of nginx's listen"),
    ("[nginx]\nlisten = 70000\n", 8, "nginx.listen has '70000'"),
    ('[nginx]\nmax_body_size = "1m\\n"\n', 8, "nginx.max_body_size"),
    ('[sessions]\nschedule = "999999999999d"\n', 8, "sessions.schedule must be an interval of at most 366d"),
    ('[omero.web]\nlogin_logo = "/static/\\u0001.png"\n', 8, "config.xml cannot hold"),
    ('ready_timeout = 5\nready_timeout = 6\n', 8, "ready_timeout is set twice"),
])
def test_check_refuses_what_would_fail_later_with_file_and_line(tmp_path, omero_venv, body, where, needle):
    path = write(tmp_path, body, venv=omero_venv)
    code, errors = check(path)
    assert code == 1 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: {path}:{where}:") and needle in errors[0], errors[0]


def test_bind_port_out_of_range_is_refused(tmp_path, omero_venv):
    path = write(tmp_path, "", venv=omero_venv, port=70000)
    code, errors = check(path)
    assert code == 1 and len(errors) == 1 and "daemon.bind has '127.0.0.1:70000'" in errors[0], errors
    assert_one_line(run_daemon(path), 78, "daemon.bind", "65535")


def test_an_integer_nginx_listen_passes_check(tmp_path, omero_venv):
    path = write(tmp_path, "[nginx]\nlisten = 8080\n", venv=omero_venv)
    code, errors = check(path)
    assert code == 0, errors


def test_wsgi_args_that_do_not_split_stop_the_start_with_one_line(tmp_path, omero_venv):
    path = write(tmp_path, "[omero.web]\nwsgi_args = \"--log-level 'debug\"\n", venv=omero_venv)
    assert_one_line(run_daemon(path), 78, f"{path}:8:", "omero.web.wsgi_args", "no closing quotation")
    assert not list((tmp_path / "run").glob("gen-*"))  # nothing was started


def test_wsgi_args_that_do_not_split_are_a_rejected_reload_and_systemd_hears_the_end(daemon):
    daemon.write_config(workers=1, daemon="watch_config = false")
    daemon.start()
    before = daemon.status()["generation"]["master_pid"]
    mark = len(daemon.notify.messages)
    daemon.save(daemon.config_path.read_text() + "wsgi_args = \"--log-level 'debug\"\n")
    out = daemon.ctl("reload")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rejected" in out.stdout + out.stderr and "omero.web.wsgi_args" in out.stdout + out.stderr
    assert "Traceback" not in daemon.log()
    reloading = daemon.notify.wait("RELOADING", "1", after=mark)
    after = next(i for i, (_, f) in enumerate(daemon.notify.messages) if f is reloading)
    ready = daemon.notify.wait("READY", "1", after=after + 1)
    assert "last reload: rejected" in ready["STATUS"]
    assert daemon.status()["generation"]["master_pid"] == before
    assert http_get(daemon.port)[0] == 200


def test_crash_restart_keeps_trying_when_spawning_raises(tmp_path, omero_venv, notify):
    """The venv vanishes (an upgrade replacing it) just as the master dies: spawning raises
    FileNotFoundError; the daemon retries with its backoff and serves again once the venv is back."""
    link = tmp_path / "venv"
    link.symlink_to(omero_venv)
    d = Daemon(root=tmp_path / "site", venv=link, port=free_port(), notify=notify)
    try:
        d.write_config(workers=1, daemon="watch_config = false")
        d.start()
        first = d.status()["generation"]
        gone = tmp_path / "venv.swap"
        gone.symlink_to(tmp_path / "no-such-venv")
        os.replace(gone, link)  # the venv is gone...
        os.kill(first["master_pid"], signal.SIGKILL)  # ...as the serving master dies
        wait_for(lambda: "restart failed" in d.log(), 60, "a failed restart attempt")
        # The one line names what is missing (the venv's files), not a Python repr of it.
        failed = [line for line in d.log().splitlines() if "restart failed" in line][0]
        assert f"No such file or directory: {link}/" in failed and "PosixPath" not in failed, failed
        back = tmp_path / "venv.swap"
        back.symlink_to(omero_venv)
        os.replace(back, link)  # the upgrade is done
        status = d.wait_serving(timeout=120)
        assert status["generation"]["number"] > first["number"]
        assert status["crashes"] == 1 and status["last_crash"]["restart"].startswith("done")
        assert http_get(d.port)[0] == 200
        assert d.proc is not None and d.proc.poll() is None
        assert "background task failed" not in d.log()
    finally:
        d.cleanup()


def test_config_xml_with_escapes_and_a_dashed_source_is_read_by_omero_py(tmp_path, omero_venv):
    from omerowebd.omero_config import config_xml_path, write_config_xml

    props = {"omero.web.login_logo": "/static/a\tb\nc\r<&>\"'.png", "omero.web.prefix": "/omero--x"}
    write_config_xml(tmp_path, props, "/etc/omero--web/site--a-.toml")
    out = subprocess.run(
        [str(omero_venv / "bin" / "python"), "-c",
         "import json, sys, omero.config\n"
         "c = omero.config.ConfigXml(sys.argv[1], read_only=True)\n"
         "print(json.dumps(c.as_map()))\nc.close()",
         str(config_xml_path(tmp_path))],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {k: v for k, v in got.items() if k in props} == props


# -- the reload's finally, in-process: whatever _reload raises --------------------------


class _Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.sent: list[dict[str, object]] = []

    def send(self, **fields: object) -> None:
        self.sent.append(fields)


@pytest.mark.parametrize("error", [RuntimeError("a bug\nover two lines"), KeyError("x"), OSError(28, "No space left")])
def test_any_exception_in_a_reload_is_a_rejection_and_ready_follows_reloading(tmp_path, error):
    config = write(tmp_path, "", venv=tmp_path / "venv")
    notifier = _Recorder()
    supervisor = Supervisor(config_module.load(config), notifier)

    async def broken(source: str) -> dict:
        raise error

    async def scenario() -> dict:
        supervisor.applied = object()  # type: ignore[assignment]  # as if serving
        supervisor._started.set()
        supervisor._reload = broken  # type: ignore[method-assign]
        return await supervisor.reload("test")

    result = asyncio.run(scenario())
    assert result["exit_code"] == 1 and result["outcome"] == "rejected"
    assert type(error).__name__ in result["message"] and "\n" not in result["message"]
    kinds = [next(iter(f)) for f in notifier.sent if "RELOADING" in f or "READY" in f]
    assert kinds == ["RELOADING", "READY"]
    assert supervisor.last_reload is result


# The crash restart's backoff (the same whatever spawning raises) is tested with the
# generations' state machine: tests/unit/test_generations.py.
