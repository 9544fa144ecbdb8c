"""omerowebctl rollout with stand-in hosts: the order, the stop at the first failure and its
exit code, the canaries' settle time, the dry run, ssh's command line and the word of a
remote host read as untrusted data."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from omerowebd import ctl, rollout
from omerowebd.commands import rollout as rollout_command
from unit.test_control_client import fake_daemon  # noqa: F401 (a fixture)


@dataclass
class FakeHost:
    """A host whose reload answers ``reply`` and whose status is ``statuses`` in turn (the last repeats)."""

    name: str
    reply: dict[str, Any] = field(default_factory=lambda: {"exit_code": 0, "outcome": "applied", "generation": 2})
    statuses: list[Any] = field(default_factory=lambda: [{"serving": True, "crashes": 0,
                                                           "generation": {"number": 2, "worker_faults": 0}}])
    log: list[str] | None = None
    status_calls: int = 0

    def reload(self, dry_run: bool) -> rollout.Reply:
        if self.log is not None:
            self.log.append(f"{'dry-run' if dry_run else 'reload'} {self.name}")
        return rollout.reply_from(self.reply)

    def status(self) -> dict[str, Any]:
        value = self.statuses[min(self.status_calls, len(self.statuses) - 1)]
        self.status_calls += 1
        if isinstance(value, Exception):
            raise value
        return value


class FakeClock(rollout.Clock):
    def __init__(self) -> None:
        self.now = 1000.0
        super().__init__(monotonic=lambda: self.now, sleep=self._sleep)
        self.slept = 0.0

    def _sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.now += seconds
        self.slept += seconds


def hosts(*names: str, log: list[str] | None = None, **replies: dict[str, Any]) -> list[FakeHost]:
    return [FakeHost(n, replies.get(n, {"exit_code": 0, "outcome": "applied", "generation": 2}), log=log)
            for n in names]


def test_hosts_are_reloaded_in_the_order_given_each_once() -> None:
    log: list[str] = []
    result = rollout.run(hosts("a", "b", "c", log=log))
    assert log == ["reload a", "reload b", "reload c"]
    assert result.exit_code == 0 and result.stopped_at is None
    assert [(s.host, s.outcome, s.generation) for s in result.steps] == [("a", "applied", 2), ("b", "applied", 2),
                                                                         ("c", "applied", 2)]
    assert rollout.summary(result) == "rollout: applied on all 3 host(s)"


@pytest.mark.parametrize("reply, code", [
    ({"exit_code": 1, "outcome": "rejected", "message": "bad value"}, 1),
    ({"exit_code": 2, "outcome": "rolled back", "message": "Worker failed to boot"}, 2),
    ({"exit_code": 4, "outcome": "restart required", "message": "daemon.runtime_dir changed"}, 4),
    ({"exit_code": 5, "outcome": "reverted", "message": "workers crash-looped"}, 5),  # a settle-and-revert
    ({"exit_code": 1, "outcome": "cancelled", "message": "the daemon is stopping"}, 1),
    ({"exit_code": 0, "outcome": "accepted", "message": "reload accepted"}, 1),  # not waited for: not a success
    ({"exit_code": 0, "outcome": "something new"}, 1),  # an outcome this version does not know
    ({"exit_code": 3, "outcome": "unreachable", "message": "omerowebd is not running"}, 3),
    ({"ok": False, "error": "unknown command 'reload'"}, 1),  # no exit code at all
])
def test_the_first_host_that_does_not_succeed_stops_the_rollout_with_its_code(reply: dict[str, Any], code: int) -> None:
    log: list[str] = []
    result = rollout.run(hosts("a", "b", "c", log=log, b=reply))
    assert log == ["reload a", "reload b"]  # c is never touched
    assert result.exit_code == code
    assert result.stopped_at == "b"
    assert [(s.host, s.exit_code) for s in result.steps] == [("a", 0), ("b", code), ("c", None)]
    assert result.steps[2].outcome == "not reached"
    assert rollout.summary(result).startswith(f"rollout stopped at b: {result.steps[1].outcome} (exit {code}); "
                                              "1 host(s) done before it, 1 not reached")


def test_nothing_to_do_counts_as_success() -> None:
    result = rollout.run(hosts("a", "b", a={"exit_code": 0, "outcome": "nothing to do"}))
    assert result.exit_code == 0 and [s.outcome for s in result.steps] == ["nothing to do", "applied"]


def test_dry_run_asks_every_host_for_its_dry_run_and_ignores_canaries() -> None:
    log: list[str] = []
    dry = {"exit_code": 0, "outcome": "dry run", "message": "would start a new gunicorn generation",
           "changes": ["omero.web.login_logo"]}
    fleet = hosts("a", "b", log=log, a=dry, b=dry)
    clock = FakeClock()
    result = rollout.run(fleet, dry_run=True, canary=1, settle=30, clock=clock)
    assert log == ["dry-run a", "dry-run b"]
    assert result.exit_code == 0 and result.dry_run and result.settle is None
    assert clock.slept == 0 and all(h.status_calls == 0 for h in fleet)
    assert result.steps[0].changes == ("omero.web.login_logo",)
    assert rollout.summary(result) == "rollout: would apply on all 2 host(s)"
    # A dry run that says "applied" did something it should not have: not a dry run's success.
    result = rollout.run(hosts("a", "b", a={"exit_code": 0, "outcome": "applied"}), dry_run=True)
    assert result.exit_code == 1 and result.stopped_at == "a"


def test_dry_run_stops_at_a_host_that_would_reject() -> None:
    log: list[str] = []
    dry = {"exit_code": 0, "outcome": "dry run"}
    result = rollout.run(hosts("a", "b", "c", log=log, a=dry, b={"exit_code": 1, "outcome": "rejected"}, c=dry),
                         dry_run=True)
    assert log == ["dry-run a", "dry-run b"] and result.exit_code == 1


def healthy(generation: int = 2, crashes: int = 0, faults: int = 0, **extra: Any) -> dict[str, Any]:
    return {"serving": True, "state": "serving", "crashes": crashes,
            "generation": {"number": generation, "state": "serving", "worker_faults": faults}, **extra}


def test_canaries_are_watched_for_the_settle_time_before_the_rest() -> None:
    log: list[str] = []
    fleet = hosts("a", "b", "c", log=log)
    for h in fleet:
        h.statuses = [healthy(generation=1), healthy()]  # before its reload, then after
    clock = FakeClock()
    settled: list[tuple[list[str], float]] = []

    def reload_c(dry_run: bool) -> rollout.Reply:
        assert clock.slept == pytest.approx(30)  # c only once the canaries have settled
        log.append("reload c")
        return rollout.reply_from({"exit_code": 0, "outcome": "applied", "generation": 2})

    fleet[2].reload = reload_c  # type: ignore[method-assign]
    result = rollout.run(fleet, canary=2, settle=30, interval=1, clock=clock,
                         on_settle=lambda names, seconds: settled.append((list(names), seconds)))
    assert log == ["reload a", "reload b", "reload c"]
    assert result.exit_code == 0
    assert settled == [(["a", "b"], 30)]
    assert result.settle == {"seconds": 30, "canaries": ["a", "b"], "healthy": True}
    assert [s.canary for s in result.steps] == [True, True, False]
    # Each canary was looked at before its reload, after it, and about once a second for 30 s.
    assert fleet[0].status_calls >= 30 and fleet[1].status_calls >= 30
    assert fleet[2].status_calls == 0  # not a canary: its reload's own outcome is its verdict


@pytest.mark.parametrize("later, why", [
    (healthy(crashes=1), "crashed 1 time(s) since the reload"),
    (healthy(faults=3), "3 worker(s) died since the reload"),
    (healthy(generation=3), "generation 3 serves, not generation 2 that the reload started"),
    ({"serving": False, "state": "restarting", "crashes": 0, "generation": None}, "not serving (state restarting)"),
    (healthy(last_reload={"outcome": "reverted", "message": "health probe failed"}),
     "its last reload was reverted: health probe failed"),
])
def test_a_canary_that_turns_unhealthy_stops_the_rollout(later: dict[str, Any], why: str) -> None:
    log: list[str] = []
    fleet = hosts("a", "b", "c", log=log)
    fleet[0].statuses = [healthy(generation=1), healthy(), healthy(), healthy(), later]
    clock = FakeClock()
    result = rollout.run(fleet, canary=1, settle=10, interval=1, clock=clock)
    assert log == ["reload a"]
    assert result.exit_code == rollout.EXIT_CANARY_UNHEALTHY == 6
    assert result.stopped_at == "a" and result.settle["healthy"] is False
    assert result.steps[0].outcome == "unhealthy" and why in result.steps[0].message
    assert [s.outcome for s in result.steps[1:]] == ["not reached", "not reached"]
    assert 0 < clock.slept < 10


def test_a_crash_during_the_canary_reload_counts() -> None:
    """The crash count is taken before the reload: a master that crashed and came back while the
    reload ran is caught by the first look after it."""
    fleet = hosts("a", "b")
    fleet[0].statuses = [healthy(generation=1), healthy(crashes=1)]
    result = rollout.run(fleet, canary=1, settle=5, clock=FakeClock())
    assert result.exit_code == 6 and "crashed" in result.steps[0].message


def test_a_canary_that_cannot_be_reached_stops_the_rollout_as_unreachable() -> None:
    fleet = hosts("a", "b")
    fleet[0].statuses = [healthy(generation=1), healthy(), rollout.Unreachable("ssh failed: Connection refused")]
    result = rollout.run(fleet, canary=1, settle=5, clock=FakeClock())
    assert result.exit_code == 3 and result.steps[0].outcome == "unreachable"
    assert [s.outcome for s in result.steps] == ["unreachable", "not reached"]
    fleet = hosts("a", "b")
    fleet[0].statuses = [rollout.Unreachable("omerowebd is not running")]  # before the reload: never reloaded
    log: list[str] = []
    fleet[0].log = log
    assert rollout.run(fleet, canary=1, settle=5, clock=FakeClock()).exit_code == 3 and log == []


def test_no_settle_wait_when_every_host_is_a_canary() -> None:
    clock = FakeClock()
    result = rollout.run(hosts("a", "b"), canary=2, settle=60, clock=clock)
    assert result.exit_code == 0 and clock.slept == 0 and result.settle is None


# -- ssh --------------------------------------------------------------------------------


def test_ssh_command_line_keeps_the_host_out_of_ssh_s_options() -> None:
    host = rollout.SshHost("omero@web2.example.org", 100, Path("/etc/omerowebd/fleet.ssh"))
    assert host.argv("reload", "--json") == [
        "ssh", "-n", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4", "-F", "/etc/omerowebd/fleet.ssh",
        "--", "omero@web2.example.org", "omerowebctl", "reload", "--json"]
    assert rollout.SshHost("web2", 100).argv("status", "--json")[-5:] == ["--", "web2", "omerowebctl", "status",
                                                                          "--json"]


@pytest.mark.parametrize("good", ["web2", "web2.example.org", "omero@web2", "omero-web@10.0.0.2", "::1",
                                  "root@fe80::1", "host_alias", "a"])
def test_ssh_targets_that_are_hosts(good: str) -> None:
    assert rollout.ssh_target_problem(good) is None


@pytest.mark.parametrize("bad", ["-oProxyCommand=touch /tmp/x", "-F/tmp/evil", "--", "-", "web2 -v", "web2;id",
                                 "$(id)", "`id`", "web2\nid", "user@-oProxyCommand=x", "%h", "ssh://web2:2222",
                                 "web2/x", "@web2", "a@b@c", "", "web2.", ".web2", "user name@web2", "web\u202e2"])
def test_ssh_targets_that_could_be_options_or_shell_are_refused(bad: str) -> None:
    assert rollout.ssh_target_problem(bad) is not None
    with pytest.raises(rollout.UserError):
        rollout.SshHost(bad, 100)


def test_the_command_line_refuses_an_option_as_a_host() -> None:
    proc = subprocess.run([sys.executable, "-m", "omerowebd.ctl", "rollout", "--ssh=-oProxyCommand=touch x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--ssh '-oProxyCommand=touch x' starts with '-'" in proc.stderr


def fake_ssh(returncode: int | None, stdout: bytes = b"", stderr: bytes = b"", problem: str | None = None,
             calls: list[list[str]] | None = None) -> rollout.Runner:
    def run(argv: list[str], timeout: float) -> tuple[int | None, bytes, bytes, str | None]:
        assert timeout > 0
        if calls is not None:
            calls.append(argv)
        return returncode, stdout, stderr, problem
    return run


def ssh_reply(**kw: Any) -> rollout.Reply:
    return rollout.SshHost("web2", 100, run=fake_ssh(**kw)).reload(False)


def test_ssh_reload_reads_the_remote_reply() -> None:
    calls: list[list[str]] = []
    line = json.dumps({"ok": True, "exit_code": 0, "outcome": "applied", "message": "new generation serving",
                       "generation": 7, "changes": ["omero.web.login_logo"]}).encode()
    host = rollout.SshHost("web2", 100, run=fake_ssh(0, b"Welcome to web2\n" + line + b"\n", calls=calls))
    reply = host.reload(False)
    assert reply == rollout.Reply("applied", 0, "new generation serving", 7, ("omero.web.login_logo",))
    assert calls[0][-3:] == ["omerowebctl", "reload", "--json"]
    host.reload(True)
    assert calls[1][-4:] == ["omerowebctl", "reload", "--json", "--dry-run"]


def test_hostile_remote_text_is_made_printable_and_short() -> None:
    evil = "\x1b]0;pwned\x07\x1b[2J rolled \u202eback\u2028" + "x" * 10_000
    reply = ssh_reply(returncode=2, stdout=json.dumps({"exit_code": 2, "outcome": "rolled\x1b[31m back",
                                                       "message": evil, "changes": [evil] * 1000}).encode())
    assert reply.exit_code == 2
    for text in (reply.outcome, reply.message, *reply.changes):
        assert "\x1b" not in text and "\u202e" not in text and "\u2028" not in text and "\x07" not in text
    assert len(reply.message) <= rollout.MAX_MESSAGE and len(reply.outcome) <= 40
    assert len(reply.changes) <= 100


@pytest.mark.parametrize("stdout, returncode, outcome, code", [
    (b"", 2, "error", 2),  # an omerowebctl without reload --json: argparse's exit 2
    (b"not json at all", 0, "error", 1),
    (b"[1, 2, 3]", 0, "error", 1),  # JSON, not an object
    (b"[" * 100_000 + b"]" * 100_000, 0, "error", 1),  # nested past the parser's recursion limit
    (json.dumps({"exit_code": 0, "outcome": "applied", "pad": "x" * (2 << 20)}).encode(), 0, "error", 1),  # too big
    (json.dumps({"exit_code": "0", "outcome": "applied"}).encode(), 0, "applied", 1),  # a code of another type
    (json.dumps({"exit_code": True, "outcome": "applied"}).encode(), 0, "applied", 1),
    (json.dumps({"exit_code": 999, "outcome": "applied"}).encode(), 0, "applied", 1),
    (json.dumps({"exit_code": 0, "outcome": "applied"}).encode(), 1, "applied", 1),  # claims success, exited 1
    (json.dumps({"exit_code": 0, "outcome": ["applied"]}).encode(), 0, "?", 1),
])
def test_remote_output_of_the_wrong_shape_is_a_failure_never_a_traceback(stdout: bytes, returncode: int, outcome: str,
                                                                        code: int) -> None:
    result = rollout.run([rollout.SshHost("web2", 100, run=fake_ssh(returncode, stdout))])
    assert (result.steps[0].outcome, result.steps[0].exit_code, result.exit_code) == (outcome, code, code)


def test_ssh_failures_are_unreachable_with_ssh_s_own_words() -> None:
    reply = ssh_reply(returncode=255, stderr=b"debug\nssh: connect to host web2 port 22: Connection refused\r\n")
    assert (reply.outcome, reply.exit_code) == ("unreachable", 3)
    assert reply.message == "ssh failed: ssh: connect to host web2 port 22: Connection refused"
    reply = ssh_reply(returncode=None)  # the deadline passed
    assert (reply.outcome, reply.exit_code) == ("unreachable", 3) and "no answer over ssh within 160s" in reply.message
    reply = ssh_reply(returncode=0, problem="it wrote over 4 MiB where a report of a few KiB belongs")
    assert (reply.outcome, reply.exit_code) == ("unreachable", 3)
    with pytest.raises(rollout.Unreachable, match=r"ssh failed: root@web2: Permission denied \(publickey\)"):
        rollout.SshHost("web2", 100, run=fake_ssh(255, stderr=b"root@web2: Permission denied (publickey).")).status()


def test_ssh_status_is_parsed_from_status_json() -> None:
    status = {"serving": True, "crashes": 0, "generation": {"number": 4, "worker_faults": 0, "x": "\x1b[2J"}}
    host = rollout.SshHost("web2", 100, run=fake_ssh(0, json.dumps(status, indent=2).encode()))
    assert host.status()["generation"]["x"] == "?[2J"
    with pytest.raises(rollout.Unreachable, match="printed no status"):
        rollout.SshHost("web2", 100, run=fake_ssh(3, b"", b"omerowebctl: omerowebd is not running")).status()


def test_ssh_is_run_with_a_deadline_and_a_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real runner: an `ssh` on PATH that writes without end, and one that never exits."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text("#!/bin/sh\ncase \"$*\" in *flood*) exec yes ;; *) exec sleep 600 ;; esac\n")
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    returncode, stdout, _, problem = rollout._run_bounded(["ssh", "flood"], 60)
    assert problem and "MiB" in problem and len(stdout) <= (4 << 20) + (1 << 20)
    returncode, _, _, problem = rollout._run_bounded(["ssh", "x"], 0.5)
    assert returncode is None


# -- the socket and the command line ----------------------------------------------------


def test_socket_host_reads_the_daemon_s_reply_as_untrusted(fake_daemon: tuple[Path, list[bytes]]) -> None:
    path, replies = fake_daemon
    replies.append(json.dumps({"exit_code": 2, "outcome": "rolled back", "message": "boot \x1b[2Jfailed"}).encode()
                   + b"\n")
    reply = rollout.SocketHost(path, 30).reload(False)
    assert reply == rollout.Reply("rolled back", 2, "boot ?[2Jfailed")
    missing = rollout.SocketHost(path.with_name("none.sock"), 30).reload(False)
    assert (missing.outcome, missing.exit_code) == ("unreachable", 3)
    with pytest.raises(rollout.Unreachable):
        rollout.SocketHost(path.with_name("none.sock"), 30).status()


def test_mixed_targets_keep_their_order_on_the_command_line() -> None:
    args = ctl.build_parser().parse_args(["--socket", "/run/ignored.sock", "rollout", "--ssh", "web1", "--socket",
                                          "/run/a.sock", "--ssh", "omero@web3", "--timeout", "120"])
    assert args.socket == "/run/ignored.sock"  # omerowebctl's own --socket is another option
    found = [(type(h).__name__, h.name) for h in rollout_command.hosts_of(args)]
    assert found == [("SshHost", "web1"), ("SocketHost", "/run/a.sock"), ("SshHost", "omero@web3")]
    assert all(h.reload_timeout == 120 for h in rollout_command.hosts_of(args))


def test_rollout_command_prints_a_table_and_exits_with_the_failing_host_s_code(
        fake_daemon: tuple[Path, list[bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, replies = fake_daemon
    replies.append(json.dumps({"exit_code": 1, "outcome": "rejected", "message": "omero.web.x: bad"}).encode() + b"\n")
    code = ctl.main(["rollout", "--timeout", "30", "--socket", str(path), "--ssh", "web9"])
    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["host", "outcome", "generation", "seconds", "message"]
    assert lines[1].split()[:2] == [str(path), "rejected"] and lines[1].endswith("omero.web.x: bad")
    assert lines[2].split() == ["web9", "not", "reached", "-", "-"]
    assert err.strip() == f"rollout stopped at {path}: rejected (exit 1); 0 host(s) done before it, 1 not reached"
    replies.append(json.dumps({"exit_code": 0, "outcome": "dry run", "message": "would start a new gunicorn generation",
                               "changes": ["omero.web.login_logo", "nginx.listen"]}).encode() + b"\n")
    assert ctl.main(["rollout", "--dry-run", "--timeout", "30", "--socket", str(path)]) == 0
    out, _ = capsys.readouterr()
    first = out.splitlines()[1]
    assert first.startswith(f"{path}  dry run                          -  ")  # then the seconds it took
    assert first.endswith("  would start a new gunicorn generation")
    assert out.splitlines()[2:] == [
        f"{' ' * len(str(path))}  changed: omero.web.login_logo",
        f"{' ' * len(str(path))}  changed: nginx.listen",
        "rollout: would apply on all 1 host(s)"]
    replies.append(json.dumps({"exit_code": 2, "outcome": "rolled back", "message": "m"}).encode() + b"\n")
    assert ctl.main(["rollout", "--json", "--timeout", "30", "--socket", str(path)]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 2 and report["stopped_at"] == str(path)
    assert report["hosts"] == [{"host": str(path), "outcome": "rolled back", "exit_code": 2, "message": "m",
                                "generation": None, "seconds": report["hosts"][0]["seconds"], "changes": [],
                                "canary": False}]


def test_rollout_command_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["rollout"]) == 2
    assert "needs at least one host" in capsys.readouterr().err
    assert ctl.main(["rollout", "--canary", "3", "--ssh", "a", "--ssh", "b", "--timeout", "5"]) == 2
    assert "--canary 3: there are only 2 host(s)" in capsys.readouterr().err


def test_reload_json_prints_one_line_even_when_the_daemon_does_not_answer(
        fake_daemon: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    path, replies = fake_daemon
    replies.append(json.dumps({"exit_code": 0, "outcome": "applied", "message": "new \x1b[2J", "generation": 3})
                   .encode() + b"\n")
    assert ctl.main(["--socket", str(path), "reload", "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "\x1b" not in out
    assert json.loads(out) == {"exit_code": 0, "outcome": "applied", "message": "new ?[2J", "generation": 3}
    assert ctl.main(["--socket", str(path.with_name("none.sock")), "reload", "--json"]) == 3
    reply = json.loads(capsys.readouterr().out)
    assert reply["exit_code"] == 3 and reply["outcome"] == "unreachable" and "not running" in reply["message"]


@pytest.mark.parametrize("depth", [700, 950])
def test_a_remote_reply_nested_deeper_than_printable_goes_is_no_reply_never_a_traceback(depth: int) -> None:
    # json.loads takes this nesting; making it printable recursed past Python's limit (on 3.11, where
    # each level is two frames) and the RecursionError ended the rollout with a traceback mid-way.
    nested = "[" * depth + "]" * depth
    stdout = ('{"exit_code": 0, "outcome": "applied", "serving": true, "x": ' + nested + "}").encode()
    json.loads(stdout)  # the parser itself accepts it
    result = rollout.run([rollout.SshHost("web2", 100, run=fake_ssh(0, stdout))])
    # No reply, unless this Python makes the whole of it printable (then it is what it says).
    assert (result.steps[0].outcome, result.exit_code) in (("error", 1), ("applied", 0))
    try:
        status = rollout.SshHost("web2", 100, run=fake_ssh(0, stdout)).status()
    except rollout.Unreachable as e:
        assert "printed no status" in str(e)
    else:
        assert status["serving"] is True and (result.steps[0].outcome == "applied")
    deep: Any = []
    for _ in range(5000):  # what a local daemon's reply could hold, were it handed over unparsed
        deep = [deep]
    assert rollout.reply_from({"exit_code": 0, "outcome": "applied", "x": deep}).exit_code == 1
