"""`omerowebctl nginx` prints what `omero web config nginx|nginx-location|
nginx-development` prints, byte for byte, for many option sets; the port
conflict and the unsupported application servers are refused by both.

The reference is the real `omero` CLI in the OMERO.web venv. It refuses to
run as root, so as root it runs as `nobody` on a site directory that user may
write.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from omerowebd import config as config_module
from omerowebd import desired, nginx, omero_config, venv
from omerowebd.errors import UserError
from omerowebd.venv import VenvInfo

pytestmark = pytest.mark.omeroweb

PROPERTY_SETS: dict[str, dict[str, str]] = {
    "defaults": {},
    "prefix": {"omero.web.prefix": "/omero"},
    "prefix-trailing-slash": {"omero.web.prefix": "/omero/"},
    "prefix-punctuation": {"omero.web.prefix": "/my-site/omero_web.v2"},
    "prefix-unicode": {"omero.web.prefix": "/ømero"},
    "prefix-and-static-url": {"omero.web.prefix": "/omero", "omero.web.static_url": "/omero/static/"},
    "static-url-without-slash": {"omero.web.static_url": "/assets"},
    "static-root-normalized": {"omero.web.static_root": "/srv/omero/../static/"},
    "application-server": {"omero.web.application_server.host": "0.0.0.0",
                           "omero.web.application_server.port": "4090"},
    "extra-config": {"omero.web.nginx_server_extra_config": json.dumps(
        ["client_body_timeout 60s;", "location /healthz { return 204; }"])},
    "deprecated-force-script-name": {"omero.web.force_script_name": "/legacy"},
    "prefix-beats-deprecated": {"omero.web.prefix": "/new", "omero.web.force_script_name": "/old"},
}
ARGUMENT_SETS: dict[str, list[str]] = {
    "no-options": [],
    "http": ["--http", "8000"],
    "http-zero-is-default": ["--http", "0"],
    "servername-and-body-size": ["--servername", "omero.example.org www.example.org", "--max-body-size", "100m"],
}
KINDS = list(nginx.KINDS)

CASES = [(p, k, "no-options") for p in PROPERTY_SETS for k in KINDS]
CASES += [("prefix-and-static-url", k, a) for k in KINDS for a in ARGUMENT_SETS if a != "no-options"]

REFUSALS = {
    # name: (properties, kind, args, what both say)
    "port-conflict-server": ({"omero.web.application_server.port": "80"}, "server", [],
                             "Port conflict: HTTP(80) and wsgi(80)."),
    "port-conflict-development": ({"omero.web.application_server.port": "8080"}, "development", [],
                                  "Port conflict: HTTP(8080) and wsgi(8080)."),
    "port-conflict-location-http": ({"omero.web.application_server.port": "8000"}, "location", ["--http", "8000"],
                                    "Port conflict: HTTP(8000) and wsgi(8000)."),
    "application-server-wsgi": ({"omero.web.application_server": "wsgi"}, "server", [],
                                "omero.web.application_server=wsgi cannot be used"),
    "application-server-development": ({"omero.web.application_server": "development"}, "location", [],
                                       "omero.web.application_server=development cannot be used"),
}


class OmeroCli:
    """Runs the venv's real `omero web config` on a site directory of its own."""

    def __init__(self, venv_dir: Path, base: Path) -> None:
        self.venv = venv_dir
        self.base = base

    def site(self, name: str, properties: dict[str, str]) -> Path:
        omerodir = self.base / name
        if not omerodir.exists():
            omero_config.write_config_xml(omerodir, properties)
            # OMERO.web's settings create var/log if it is missing, racily: two
            # `omero web config` runs on one site at once can trip over it.
            (omerodir / "var" / "log").mkdir(parents=True)
            if os.geteuid() == 0:
                subprocess.run(["chown", "-R", "nobody", str(omerodir)], check=True)
        return omerodir

    def config(self, omerodir: Path, kind: str, args: list[str]) -> subprocess.CompletedProcess[bytes]:
        env = {"PATH": "/usr/bin:/bin", "OMERODIR": str(omerodir), "HOME": str(omerodir), "LC_ALL": "C.UTF-8"}
        command = [str(self.venv / "bin" / "omero"), "web", "config", nginx.KINDS[kind], *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
            env = {}
        return subprocess.run(command, env=env or None, cwd=omerodir, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def omero_cli(omero_venv: Path) -> Iterator[OmeroCli]:
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.fail("running as root needs runuser to run the omero CLI as nobody")
    # Not under pytest's tmp_path: that is private to root, and the CLI runs as nobody.
    base = Path(tempfile.mkdtemp(prefix="omerowebd-nginx-render-"))
    base.chmod(0o755)
    try:
        yield OmeroCli(omero_venv, base)
    finally:
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def references(omero_cli: OmeroCli) -> dict[tuple[str, str, str], subprocess.CompletedProcess[bytes]]:
    """Every reference output, produced two at a time (the CLI takes about a second to start)."""
    jobs = {case: (omero_cli.site(case[0], PROPERTY_SETS[case[0]]), case[1], ARGUMENT_SETS[case[2]])
            for case in CASES}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {case: pool.submit(omero_cli.config, *job) for case, job in jobs.items()}
        return {case: f.result() for case, f in futures.items()}


@pytest.fixture(scope="module")
def info(omero_venv: Path) -> VenvInfo:
    return venv.probe_sync(omero_venv, {})


def ours(info: VenvInfo, omerodir: Path, properties: dict[str, str], kind: str, args: list[str]) -> str:
    options = {"http": None, "servername": "$hostname", "max_body_size": "0"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        options[flag.lstrip("-").replace("-", "_")] = int(value) if flag == "--http" else value
    web = nginx.web_settings(properties, info, omerodir)
    nginx.check_web_settings(web)
    return nginx.render(kind, web, info, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_render_is_byte_identical_to_omero_web_config(case: tuple[str, str, str], omero_cli: OmeroCli,
                                                      references: dict, info: VenvInfo) -> None:
    props_name, kind, args_name = case
    reference = references[case]
    assert reference.returncode == 0, reference.stderr.decode(errors="replace")
    assert reference.stdout.count(b"\n") > 10  # a whole template came out, not an error
    omerodir = omero_cli.site(props_name, PROPERTY_SETS[props_name])
    assert ours(info, omerodir, PROPERTY_SETS[props_name], kind, ARGUMENT_SETS[args_name]).encode() == reference.stdout


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_by_both(name: str, omero_cli: OmeroCli, info: VenvInfo) -> None:
    properties, kind, args, message = REFUSALS[name]
    omerodir = omero_cli.site(f"refusal-{name}", properties)
    reference = omero_cli.config(omerodir, kind, args)
    assert reference.returncode != 0
    assert message in reference.stderr.decode()
    with pytest.raises(UserError) as e:
        ours(info, omerodir, properties, kind, args)
    assert message in str(e.value)
    assert e.value.exit_code == 1


def _toml(omerodir: Path, venv_dir: Path, properties: dict[str, str]) -> str:
    lines = ["[daemon]", f"omerodir = {json.dumps(str(omerodir))}", f"venv = {json.dumps(str(venv_dir))}", "[omero]"]
    # A quoted key with dots is the property name as it is (see omero_config).
    lines += [f"{json.dumps(name.removeprefix('omero.'))} = {json.dumps(value)}" for name, value in properties.items()]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("props_name, kind, args_name", [
    ("prefix-and-static-url", "server", "http"),
    ("extra-config", "location", "no-options"),
    ("defaults", "development", "servername-and-body-size"),
])
def test_omerowebctl_nginx_prints_the_same_bytes(props_name: str, kind: str, args_name: str, omero_cli: OmeroCli,
                                                 omero_venv: Path, tmp_path: Path) -> None:
    properties = PROPERTY_SETS[props_name]
    omerodir = omero_cli.site(props_name, properties)
    reference = omero_cli.config(omerodir, kind, ARGUMENT_SETS[args_name])
    assert reference.returncode == 0, reference.stderr
    config = tmp_path / "omerowebd.toml"
    config.write_text(_toml(omerodir, omero_venv, properties))
    done = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), "nginx", kind,
                           *ARGUMENT_SETS[args_name]], capture_output=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout == reference.stdout


def test_omerowebctl_nginx_port_conflict_is_one_line_exit_1(omero_cli: OmeroCli, omero_venv: Path,
                                                            tmp_path: Path) -> None:
    config = tmp_path / "omerowebd.toml"
    config.write_text(_toml(tmp_path / "site", omero_venv, {"omero.web.application_server.port": "8080"}))
    done = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), "nginx", "server",
                           "--http", "8080"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "omerowebctl: Port conflict: HTTP(8080) and wsgi(8080). Pick another port with --http\n"


def test_omerowebctl_nginx_refuses_a_value_that_would_end_a_directive(omero_venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "omerowebd.toml"
    config.write_text(_toml(tmp_path / "site", omero_venv, {"omero.web.prefix": "/omero;evil"}))
    done = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "--config", str(config), "nginx", "server"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 78
    assert done.stderr == (f"omerowebctl: {config}:5: omero.web.prefix '/omero;evil' contains ';',"
                           " which ends an nginx directive\n")


def test_written_server_file_is_omero_web_config_plus_marked_additions(omero_cli: OmeroCli, info: VenvInfo,
                                                                       omero_venv: Path, tmp_path: Path) -> None:
    """With no redirects or upstreams, the daemon's file differs from the reference
    only by its header, the maintenance page's root, the proxy's error_page and the
    static location's disable_symlinks."""
    properties = PROPERTY_SETS["prefix-and-static-url"]
    omerodir = omero_cli.site("prefix-and-static-url", properties)
    reference = omero_cli.config(omerodir, "server", ["--http", "8081", "--servername", "omero.example.org"])
    assert reference.returncode == 0, reference.stderr
    path = tmp_path / "omerowebd.toml"
    path.write_text(_toml(omerodir, omero_venv, properties).replace("[omero]", textwrap.dedent(f"""\
        state_dir = "{tmp_path / 'state'}"
        [nginx]
        listen = "8081"
        server_name = "omero.example.org"
        [omero]""")))
    config = config_module.load(path)
    out = nginx.render_outputs(config, config.properties, info, desired.backends_of(config))
    written = out.files[out.server].decode().splitlines(keepends=True)
    assert written[0].startswith("# Written by omerowebd from omero-web's nginx.conf.template")
    added = [i for i, line in enumerate(written) if "# omerowebd:" in line]
    # Each added directive is the line below its comment (the maintenance root replaces the template's own).
    routed = [i + 1 for i in added if not written[i + 1].strip().startswith("root ")]
    assert [written[i].strip() for i in routed] == ["disable_symlinks if_not_owner;",
                                                    "error_page 502 @maintenance_omero;"]
    body = [line for i, line in enumerate(written) if i >= 2 and i not in added and i not in routed]
    maintenance = tmp_path / "state" / "maintenance"
    expected = reference.stdout.decode().replace(f"root {omerodir}/etc/templates/error;", f"root {maintenance};")
    assert "".join(body) == expected
    assert out.maintenance == maintenance / "maintainance.html"  # the name omero-web's try_files asks for
