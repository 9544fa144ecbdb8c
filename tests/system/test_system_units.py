"""The unit files: systemd finds nothing to complain about, the service is
hardened to an exposure of 3.0 or less, and the settings the daemon's
contract depends on are there."""

from __future__ import annotations

import configparser
import re

import pytest

from .helpers import REPO, check, run

pytestmark = pytest.mark.system

UNITS = REPO / "units"
UNIT_FILES = sorted(p.name for p in UNITS.iterdir() if p.suffix in (".service", ".socket", ".path"))
# Commands the units run that the package itself ships, or that only a host
# with nginx has: `verify` on this machine may not find them. The container
# test verifies the installed units where they all exist.
SHIPPED = {"/usr/bin/omerowebd", "/usr/bin/omerowebctl", "/usr/libexec/omerowebd-nginx-publish", "/usr/sbin/nginx"}
MAX_EXPOSURE = 3.0


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # keys are case-sensitive
    parser.read(UNITS / name)
    return parser


def all_values(name: str, section: str, key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps the last)."""
    values, current = [], None
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split("=", 1)[0].strip() == key and "=" in line:
            values.append(line.split("=", 1)[1].strip())
    return values


def test_the_expected_units_exist():
    assert UNIT_FILES == ["omerowebd-nginx.path", "omerowebd-nginx.service", "omerowebd.service", "omerowebd.socket"]


@pytest.mark.parametrize("name", UNIT_FILES)
def test_systemd_analyze_verify_prints_nothing(system_tools, name):
    # verify returns 0 even for unknown keys and typos; stderr is the verdict.
    result = run(["systemd-analyze", "verify", "--man=no", str(UNITS / name)], timeout=60)
    problems, tolerated = [], []
    for line in (result.stdout + result.stderr).splitlines():
        missing = re.search(r"Command (\S+) is not executable", line)
        (tolerated if missing and missing.group(1) in SHIPPED else problems).append(line)
    assert not problems, "\n".join(problems)
    # A missing command makes verify exit 1; anything else must not.
    assert result.returncode == 0 or tolerated


def exposure(name: str) -> float:
    result = check(["systemd-analyze", "security", "--offline=yes", str(UNITS / name)], f"systemd-analyze security {name}", timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:]
    return float(match.group(1))


@pytest.mark.parametrize("name", ["omerowebd.service", "omerowebd-nginx.service"])
def test_security_exposure_at_most_3(system_tools, name):
    score = exposure(name)
    print(f"{name}: exposure {score}")
    assert score <= MAX_EXPOSURE, f"{name}: systemd-analyze security exposure {score} > {MAX_EXPOSURE}"


def test_service_speaks_the_daemons_contract():
    service = unit("omerowebd.service")["Service"]
    assert service["Type"] == "notify"
    # gunicorn sends its own READY=1; only the daemon may change the state.
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"].split()[0] == "/usr/bin/omerowebd"
    assert service["ExecReload"].split()[:2] == ["/usr/bin/omerowebctl", "reload"]
    assert service["Restart"] == "on-failure"
    assert "78" in service["RestartPreventExitStatus"].split()
    assert service["KillMode"] == "mixed"
    assert service["User"] == service["Group"] == "omero-web"
    assert service["RuntimeDirectory"] == service["StateDirectory"] == "omerowebd"
    assert int(service["WatchdogSec"]) > 0
    # The daemon gives requests in flight graceful_timeout (wsgi_timeout, 60 s, by default) + 5 s to finish.
    assert int(service["TimeoutStopSec"]) > 65
    assert service["CapabilityBoundingSet"] == ""
    assert service["ProtectSystem"] == "strict"
    assert "/opt/omero/web/omero-web" in service["ReadWritePaths"]


def test_socket_is_named_and_on_loopback_4080():
    socket = unit("omerowebd.socket")["Socket"]
    assert all_values("omerowebd.socket", "Socket", "ListenStream") == ["127.0.0.1:4080"]
    assert socket["FileDescriptorName"]
    assert unit("omerowebd.socket")["Install"]["WantedBy"] == "sockets.target"


def test_nginx_publisher_runs_as_root_when_the_config_or_the_daemons_marker_changes():
    assert all_values("omerowebd-nginx.path", "Path", "PathChanged") == [
        "/etc/omerowebd/omerowebd.toml", "/var/lib/omerowebd/nginx/applied.json"]
    assert unit("omerowebd-nginx.path")["Path"]["Unit"] == "omerowebd-nginx.service"
    service = unit("omerowebd-nginx.service")
    assert "User" not in service["Service"]
    # The publisher runs nginx -t and the reload itself, only when it published something.
    assert all_values("omerowebd-nginx.service", "Service", "ExecStart") == ["/usr/libexec/omerowebd-nginx-publish"]
    # A flood of path events can neither stop the publishing (no start limit to hit: each run settles
    # for a second instead, which keeps the path unit's default trigger limit out of reach; no
    # condition that would end a run at once) nor become a root reload storm; a run cannot hang.
    assert service["Unit"]["StartLimitIntervalSec"] == "0"
    assert not any(key.startswith("Condition") for key in service["Unit"])
    assert not any(key.startswith("TriggerLimit") for key in unit("omerowebd-nginx.path")["Path"])
    assert 0 < int(service["Service"]["TimeoutStartSec"]) < 3600
