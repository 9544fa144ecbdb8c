"""Hostile and random input: never a traceback, never a hang, never a changed file when refused (issue 10).

Property-based (hypothesis): generated and mutated TOML documents go through
the config parser and through ``omerowebctl check FILE``; random lines go to
the control socket's server; random command lines go to omerowebctl. Each run
is bounded: a modest number of examples and a hard deadline per example (a
hang fails the test, it does not stall the suite).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import math
import os
import re
import signal
import string
import xml.parsers.expat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omerowebd import checks, ctl, venv
from omerowebd.config import TABLES, parse
from omerowebd.control import ControlServer
from omerowebd.errors import ConfigError, ConfigErrors, UserError
from omerowebd.omero_config import render_config_xml
from omerowebd.venv import VenvInfo

PATH = Path("/etc/omerowebd/omerowebd.toml")
HANG = 20  # seconds: far more than any example needs, even on a loaded machine

FUZZ = settings(
    max_examples=int(os.environ.get("OMEROWEBD_FUZZ_EXAMPLES", "60")),
    deadline=None,  # the machine is shared: our own alarm says what a hang is
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=not os.environ.get("OMEROWEBD_FUZZ_EXAMPLES"),  # CI: the same examples each run, replayable
)


@contextlib.contextmanager
def no_hang(seconds: float = HANG) -> Iterator[None]:
    """Fail (not wait) when the body runs longer than ``seconds``."""

    def expired(signum: int, frame: Any) -> None:
        raise AssertionError(f"hung: still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- TOML documents --------------------------------------------------------------

BARE = re.compile(r"[A-Za-z0-9_-]+\Z")
HOSTILE_TEXT = ["", " ", "\n", "\r\n", "\x00", "\x01", "\x7f", "\ufffe", "--", "-->", "<!--", "]]>", ";", "{", "}",
                "'", '"', "\\", "$", "#", "%", "../", "/", "unix:", ":", "[::1]", "0", "-1", "99999", "1e400",
                "\u202e", "\U0001f600", "a" * 300]


def toml_key(key: str) -> str:
    return key if BARE.match(key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """TOML text for a plain value (JSON's string escapes are TOML's too)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


texts = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)

FIELDS = {table: [f for f in cls.__dataclass_fields__] for table, cls in TABLES.items()}
OMERO_KEYS = ["wsgi_workers", "wsgi_threads", "wsgi_worker_connections", "wsgi_timeout", "wsgi_worker_class",
              "wsgi_args", "prefix", "debug", "apps", "application_server.host", "application_server.port",
              "application_server.max_requests", "django_additional_settings", "login_logo", "public.enabled"]


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A TOML document shaped like ours: our tables with our keys (and others), any values."""
    lines = ["[daemon]", 'omerodir = "/srv/omero"', 'venv = "/nonexistent/venv"']
    tables = draw(st.lists(st.sampled_from([*TABLES, "omero.web", "omero", "omero.web.ui", "other"]), max_size=4))
    for table in tables:
        lines.append(f"[{table}]" if table != "daemon" else "")
        known = FIELDS.get(table, OMERO_KEYS)
        for _ in range(draw(st.integers(0, 4))):
            key = draw(st.one_of(st.sampled_from(known or ["x"]), texts))
            lines.append(f"{toml_key(key) if key not in OMERO_KEYS else key} = {toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A document with its text damaged: cut, duplicated, spliced with hostile characters."""
    text = draw(documents())
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "duplicate_line", "insert", "swap_lines"]))
        lines = text.split("\n")
        if kind == "cut":
            i = draw(st.integers(0, len(text)))
            j = draw(st.integers(i, min(len(text), i + 20)))
            text = text[:i] + text[j:]
        elif kind == "duplicate_line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind == "insert":
            i = draw(st.integers(0, len(text)))
            piece = draw(st.one_of(st.sampled_from(["=", "[", "]", '"', "'", "\n", ".", "[[", "{", "}", ",", "#",
                                                    "\\", "\x00", "\ud7ff", '"""', "'''"]), texts))
            text = text[:i] + piece + text[i:]
        else:
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


def judged(data: bytes) -> None:
    """parse() either refuses with one-line problems or gives a config whose config.xml expat reads."""
    with no_hang():
        try:
            config = parse(data, PATH)
        except ConfigError as e:
            problems = e.problems if isinstance(e, ConfigErrors) else [str(e)]
            assert problems
            for problem in problems:
                assert problem.startswith(str(PATH)), problem
                assert len(problem.splitlines()) == 1, problem  # not \n, \r, \x1e, \u2028...
            return
    xml.parsers.expat.ParserCreate().Parse(render_config_xml(config.properties, str(PATH)), True)


@FUZZ
@given(documents())
def test_generated_documents_are_parsed_or_refused_in_one_line(text):
    judged(text.encode())


@FUZZ
@given(mutated())
def test_mutated_documents_are_parsed_or_refused_in_one_line(text):
    judged(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_are_parsed_or_refused_in_one_line(data):
    judged(data)


# -- omerowebctl check FILE --------------------------------------------------------

FAKE_INFO = VenvInfo(
    venv=Path("/nonexistent/venv"), versions={"omero-web": "5.29.0", "gunicorn": "23.0.0"},
    omeroweb_dir=Path("/nonexistent/omeroweb"),
    catalogue={"omero.web.wsgi_workers": {"default": 5}, "omero.web.prefix": {"default": None}},
)


@pytest.fixture
def fake_venv(monkeypatch):
    """The venv's answer without the venv: the checks after it (plan, nginx, paths) run for real."""
    monkeypatch.setattr(venv, "probe_sync", lambda *a, **k: FAKE_INFO)
    monkeypatch.setattr(checks.venv, "probe_sync", lambda *a, **k: FAKE_INFO)


def run_ctl(argv: list[str]) -> tuple[int, str, str]:
    """omerowebctl in-process: (exit code, stdout, stderr); any exception but SystemExit fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with no_hang(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = ctl.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    assert isinstance(code, int)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


@FUZZ
@given(st.one_of(documents(), mutated()))
def test_check_of_any_file_answers_with_lines_and_an_exit_code(tmp_path, fake_venv, text):
    path = tmp_path / "omerowebd.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    code, out, _ = run_ctl(["check", str(path)])
    assert code in (0, 1), (code, out)
    for line in out.splitlines():
        assert line.startswith(("error: ", "warning: ", "ok: ")), line
    assert (code == 0) == out.splitlines()[-1].startswith("ok: ")


# -- the control socket ----------------------------------------------------------------


async def _echo(request: dict[str, Any]) -> dict[str, Any]:
    if request.get("cmd") == "boom":
        raise RuntimeError("a bug in a handler")
    return {"ok": True, "echo": request.get("cmd")}


lines = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)),
                 lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"cmd": st.one_of(st.sampled_from(["status", "reload", "boom", "sessions_clear", ""]),
                                            st.text(max_size=10), st.integers(), st.none())}).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),  # nesting deeper than json's recursion
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@FUZZ
@given(st.lists(lines, min_size=1, max_size=5))
def test_control_server_answers_every_line_or_closes_and_keeps_serving(tmp_path, batch):
    async def scenario() -> None:
        server = ControlServer(tmp_path / "c.sock", _echo)
        await server.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"), limit=1 << 22)
            try:
                for line in batch:
                    writer.write(line + b"\n")
                    await writer.drain()
                    reply = await reader.readline()
                    if not reply:
                        break  # the server closed this client: allowed, as long as it keeps serving others
                    answer = json.loads(reply)
                    assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
                    assert "Traceback" not in reply.decode()
            except (ConnectionError, BrokenPipeError):
                pass  # closed while we wrote: the same
            finally:
                writer.close()
            # Whatever that client sent, the next one is served.
            reader, writer = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
            writer.write(b'{"cmd": "status"}\n')
            await writer.drain()
            assert json.loads(await reader.readline()) == {"ok": True, "echo": "status"}
            writer.close()
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(scenario(), HANG))


# -- omerowebctl command lines ------------------------------------------------------------

BASE = """\
[daemon]
omerodir = "{root}/omerodir"
venv = "{root}/no-venv"
runtime_dir = "{root}/run"
state_dir = "{root}/state"

[nginx]
enabled = false

[omero.web]
prefix = "/omero"
wsgi_workers = 2
"""

KEYS = ["omero.web.prefix", "omero.web.wsgi_workers", "omero.web.wsgi_args", "omero.web.login_logo",
        "omero.web.apps", "omero.web.x", "daemon.bind", "daemon.venv", "nginx.listen", "nginx.max_body_size",
        "sessions.schedule", "daemon", "omero", "omero.", "omero..web", "omero.web.a b", "omero.web.x\n"]
words = st.one_of(st.sampled_from(HOSTILE_TEXT + KEYS + ["true", "8080", "[]", "{}", '["a"]', "1m\n",
                                                         "999999999999d", "--x", "-"]),
                  st.text(alphabet=string.printable + "\x00\x01\u00e9", max_size=20))


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    verb = draw(st.sampled_from([
        ["status"], ["status", "--json"], ["check"], ["reload"], ["reload", "--dry-run"], ["reload", "--no-wait"],
        ["nginx", "server"], ["nginx", "location"], ["config", "get"], ["config", "get", "--json"],
        ["config", "set"], ["config", "set", "--text"], ["config", "set", "--skip-venv-check"],
        ["config", "append"], ["config", "unset"], ["config", "export"], ["config", "import", "--dry-run"],
        ["diagnostics", "--json"], ["sessions", "status"], ["sessions", "clear", "--dry-run"], ["bogus"], [],
    ]))
    # No NUL: a real command line cannot hold one (argv is C strings).
    rest = [w.replace("\x00", "") for w in draw(st.lists(words, max_size=3))]
    # Never `--file`, `-o`, `import FILE` outside the test's own directory: words are not paths here.
    return [*verb, *(w for w in rest if not w.startswith(("-o", "--file", "--config", "--socket")))]


@FUZZ
@given(command_lines())
def test_omerowebctl_exits_with_a_code_and_a_refusal_changes_nothing(tmp_path, argv):
    config = tmp_path / "omerowebd.toml"
    if not config.exists():
        config.write_text(BASE.format(root=tmp_path))
    before = hashlib.sha256(config.read_bytes()).hexdigest()
    code, out, err = run_ctl(["--config", str(config), "--socket", str(tmp_path / "none.sock"), *argv])
    after = hashlib.sha256(config.read_bytes()).hexdigest()
    if code != 0:
        assert before == after, (argv, code, err)
        # a refusal says why, in lines a person reads (argparse's usage counts)
        assert err.strip() or out.strip(), argv
    if after != before:  # an edit that was taken: the file is still one the daemon accepts
        try:
            parse(config.read_bytes(), config)
        except UserError as e:
            pytest.fail(f"{argv} wrote a file the daemon refuses: {e}")
        config.write_text(BASE.format(root=tmp_path))


def test_a_refused_config_set_leaves_the_file_byte_for_byte(tmp_path):
    config = tmp_path / "omerowebd.toml"
    config.write_text(BASE.format(root=tmp_path))
    before = config.read_bytes()
    for argv in (["config", "set", "omero.web.login_logo", "a\x01b"],
                 ["config", "set", "nginx.listen", "99999"],
                 ["config", "set", "sessions.schedule", "999999999999d"],
                 ["config", "set", "omero.web.x\n", "1"],
                 ["config", "set", "nginx.max_body_size", "1m\n"]):
        code, out, err = run_ctl(["--config", str(config), *argv])
        assert code != 0, (argv, out, err)
        assert config.read_bytes() == before, argv
        assert len(err.strip().splitlines()) >= 1


def test_listen_as_a_number_can_be_set_from_the_command_line(tmp_path):
    config = tmp_path / "omerowebd.toml"
    config.write_text(BASE.format(root=tmp_path))
    code, out, err = run_ctl(["--config", str(config), "config", "set", "--skip-venv-check", "nginx.listen", "8080"])
    assert code == 0, err
    assert parse(config.read_bytes(), config).nginx.listen == "8080"


@pytest.mark.parametrize("table, line", [
    ("omero.web", "wsgi_workers = 0"),
    ("omero.web", "wsgi_args = \"--x 'y\""),
    ("omero.web", 'wsgi_worker_class = "eventlet"'),
    ("nginx", "listen = 0"),
    ("daemon", 'bind = ["127.0.0.1:70000"]'),
])
def test_check_refuses_what_gunicorn_or_nginx_would(tmp_path, fake_venv, table, line):
    path = tmp_path / "omerowebd.toml"
    body = BASE.format(root=tmp_path).replace("wsgi_workers = 2\n", "")
    path.write_text(body.replace(f"[{table}]\n", f"[{table}]\n{line}\n", 1))
    code, out, _ = run_ctl(["check", str(path)])
    errors = [x for x in out.splitlines() if x.startswith("error: ")]
    assert code == 1 and len(errors) == 1 and f"{path}:" in errors[0], out
