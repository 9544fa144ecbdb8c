"""omerowebctl rollout over two real hosts (127.0.0.2 and 127.0.0.3) behind a real nginx,
under load: a change reaches both (--socket), one host after the other, without a failed
request; a dry run changes nothing; a change host B rejects, rolled out over a real sshd on
loopback (--ssh, A a canary), stops the rollout at B with B's code, A on the new config, B
on the old, both serving."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, end_process, free_port, wait_for
from integration.multihost import Host, Traffic, TwoHosts, need_nginx, two_hosts  # noqa: F401 (fixtures)

pytestmark = pytest.mark.omeroweb

SSHD = "/usr/sbin/sshd"


def logo(n: int) -> str:
    return f"https://example.org/omero-logo-{n}.png"


def shows(host: Host, n: int) -> bool:
    """The host's own login page (straight from its gunicorn) shows logo ``n``."""
    status, body = host.get()
    return status == 200 and f'<img src="{logo(n)}" />'.encode() in body


def rollout(*args: str, timeout: float = 600) -> tuple[int, dict[str, Any], str]:
    proc = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "rollout", "--json", *args],
                          capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"rollout printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, report, proc.stderr


def control_socket(host: Host) -> str:
    return str(host.runtime_dir / "control.sock")


def write(pair: TwoHosts, n: int, host: Host | None = None, extra: str = "") -> None:
    # The fixture's hosts do not watch their TOML (watch_config = false): only a reload applies it.
    pair.write(omero=f'login_logo = "{logo(n)}"\n{extra}', only=host, workers=1)


def test_rollout_over_two_hosts_under_load(two_hosts: TwoHosts, sshd: SshServer) -> None:
    pair = two_hosts
    a, b = pair.a, pair.b
    pair.write(workers=1)  # one worker a host: each of the three generations below boots OMERO.web once
    pair.start()
    t0 = time.monotonic()
    with Traffic(pair.front.port, clients=4) as load:
        load.wait_ok(20)

        # A change for both: A is reloaded and serving it before B's reload starts.
        write(pair, 1)
        code, report, err = rollout("--socket", control_socket(a), "--socket", control_socket(b))
        assert code == 0, (report, err)
        assert [(h["host"], h["outcome"], h["exit_code"]) for h in report["hosts"]] == [
            (control_socket(a), "applied", 0), (control_socket(b), "applied", 0)]
        status_a, status_b = a.status(), b.status()
        assert [h["generation"] for h in report["hosts"]] == [status_a["generation"]["number"],
                                                              status_b["generation"]["number"]]
        b_started = status_b["last_reload"]["at"] - status_b["last_reload"]["seconds"]
        assert b_started >= status_a["last_reload"]["at"] - 0.01, "B's reload began before A's had ended"
        assert shows(a, 1) and shows(b, 1)
        load.wait_ok(20)

        # A dry run reports what each host would do and changes nothing.
        write(pair, 2)
        generations = (a.status()["generation"]["number"], b.status()["generation"]["number"])
        code, report, err = rollout("--dry-run", "--socket", control_socket(a), "--socket", control_socket(b))
        assert code == 0, (report, err)
        assert [h["outcome"] for h in report["hosts"]] == ["dry run", "dry run"]
        assert all("omero.web.login_logo" in h["changes"] for h in report["hosts"])
        assert (a.status()["generation"]["number"], b.status()["generation"]["number"]) == generations
        assert shows(a, 1) and shows(b, 1)

        # B's venv refuses B's new config: the rollout stops at B with B's code (rejected, 1). Over ssh
        # (a real sshd on loopback), A first as a canary, watched (its status over ssh) before B.
        write(pair, 2, host=b, extra='debug = "sometimes"\n')
        config = sshd.client_config({"hosta": a, "hostb": b})
        code, report, err = rollout("--ssh-config", str(config), "--canary", "1", "--settle", "3",
                                    "--ssh", "root@hosta", "--ssh", "hostb")
        assert code == 1, (report, err)
        assert report["stopped_at"] == "hostb"
        assert [(h["host"], h["outcome"], h["exit_code"], h["canary"]) for h in report["hosts"]] == [
            ("root@hosta", "applied", 0, True), ("hostb", "rejected", 1, False)]
        assert "omero.web.debug" in report["hosts"][1]["message"]
        assert report["settle"] == {"seconds": 3.0, "canaries": ["root@hosta"], "healthy": True}
        assert report["hosts"][0]["generation"] == a.status()["generation"]["number"]
        assert a.status()["serving"] and b.status()["serving"]
        assert shows(a, 2) and shows(b, 1)  # A on the new config, B on the old
        load.wait_ok(20)

    counts = load.counts()
    print(f"\nthrough nginx during three rollouts ({time.monotonic() - t0:.0f}s): {dict(counts)}")
    assert counts["200"] >= 100
    assert load.failures() == [], counts


def test_rollout_over_ssh_stops_at_a_host_it_cannot_reach(sshd: SshServer, tmp_path: Path) -> None:
    """No daemon behind the second name: the rollout stops there, exit 3, with the remote's one line."""
    fake = Host(root=tmp_path / "nowhere", venv=Path(sys.executable).parent.parent, port=free_port())
    fake.save("[daemon]\nruntime_dir = \"%s\"\n" % fake.runtime_dir)
    config = sshd.client_config({"nowhere": fake})
    code, report, _ = rollout("--ssh-config", str(config), "--ssh", "nowhere", "--ssh", "closed")
    assert code == 3
    assert report["stopped_at"] == "nowhere"
    first = report["hosts"][0]
    assert first["outcome"] == "unreachable" and "omerowebd is not running" in first["message"]
    assert report["hosts"][1]["outcome"] == "not reached"
    # A host whose sshd does not answer: ssh's own words, the same exit code.
    code, report, _ = rollout("--ssh-config", str(config), "--ssh", "closed")
    assert code == 3 and report["hosts"][0]["message"].startswith("ssh failed: ")


# -- a real sshd on 127.0.0.1 ------------------------------------------------------------


class SshServer:
    """sshd on a free loopback port with a temporary host key, one authorized key, root only.

    The ssh client is the system's, given a config file of its own (``rollout --ssh-config``):
    no file of the machine's ssh set-up is read or written. The remote side runs this
    checkout's omerowebctl (a PATH the server sets) with the TOML the client names for each
    host alias (OMEROWEBD_CONFIG, sent with SetEnv)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True)
        root.chmod(0o700)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)],
                           check=True, timeout=60)
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        host_key = (root / "host_key.pub").read_text().split()
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key[0]} {host_key[1]}\n")
        bin_dir = root / "bin"
        bin_dir.mkdir()
        ctl = bin_dir / "omerowebctl"
        ctl.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m omerowebd.ctl \"$@\"\n")
        ctl.chmod(0o755)
        self.config = root / "sshd_config"
        self.config.write_text(textwrap.dedent(f"""\
            ListenAddress 127.0.0.1
            Port {self.port}
            HostKey {root / 'host_key'}
            PidFile {root / 'sshd.pid'}
            AuthorizedKeysFile {root / 'authorized_keys'}
            AuthenticationMethods publickey
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            AllowUsers root
            UsePAM no
            StrictModes no
            AcceptEnv OMEROWEBD_CONFIG
            SetEnv PATH={bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin
            PrintMotd no
            PrintLastLog no
            """))

    def start(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        subprocess.run([SSHD, "-t", "-f", str(self.config)], check=True, timeout=60)
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=(self.root / "sshd.log").open("ab"), stderr=subprocess.STDOUT)

        def listening() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            probe = subprocess.run(["ssh", "-o", "BatchMode=yes", "-F", str(self.client_config({})), "closed-probe",
                                    "true"], capture_output=True, timeout=60)
            return probe.returncode == 0

        wait_for(listening, 60, "sshd to accept a login")

    def client_config(self, hosts: dict[str, Host]) -> Path:
        """An ssh config for the aliases in ``hosts`` (each sends its host's TOML path), plus
        "closed" (nothing listens there) and "closed-probe" (the server itself, as a login check)."""
        common = textwrap.dedent(f"""\
              HostName 127.0.0.1
              Port {self.port}
              User root
              IdentityFile {self.root / 'client_key'}
              IdentitiesOnly yes
              UserKnownHostsFile {self.root / 'known_hosts'}
              GlobalKnownHostsFile /dev/null
              StrictHostKeyChecking yes
            """)
        text = f"Host closed-probe\n{common}"
        for alias, host in hosts.items():
            text += f"Host {alias}\n{common}  SetEnv OMEROWEBD_CONFIG={host.config_path}\n"
        text += f"Host closed\n  HostName 127.0.0.1\n  Port {free_port()}\n  UserKnownHostsFile /dev/null\n"
        path = self.root / f"ssh_config-{len(list(self.root.glob('ssh_config-*')))}"
        path.write_text(text)
        return path

    def stop(self) -> None:
        end_process(self.proc)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    if not os.path.exists(SSHD):
        pytest.fail(f"no {SSHD}: install openssh-server (scripts/bootstrap.sh --tests does)")
    if os.geteuid() != 0:
        pytest.skip("a real sshd that logs root in needs root")
    server = SshServer(tmp_path / "sshd")
    server.start()
    yield server
    server.stop()
