"""The warm venv probe: a probe that answered garbage, nothing, or too late is
replaced, and an answer is never taken for the answer to another question.

A fake probe stands in for venv_probe.py: a small script that follows a plan
(one action per question, counted across processes) and reports its pid and
the question it answers, so the test can tell who answered what.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from omerowebd import venv as venv_module
from omerowebd.errors import ConfigError
from omerowebd.venv import Prober

from .test_sessions import autogroup_nice

FAKE_PROBE = textwrap.dedent(
    """\
    import json, os, sys, time
    state = sys.argv[1]
    plan = json.load(open(os.path.join(state, "plan.json")))
    for line in sys.stdin:
        question = json.loads(line)
        with open(os.path.join(state, "asked"), "a+") as f:
            f.seek(0)
            n = len(f.read().splitlines())
            f.write(str(os.getpid()) + "\\n")
        action = plan[n] if n < len(plan) else "good"
        answer = {"versions": {"pid": str(os.getpid()), "q": question["properties"]["q"]},
                  "omeroweb_dir": "/x", "catalogue": {}, "errors": {}, "fatal": None, "id": question.get("id")}
        if action == "garbage":
            sys.stdout.write("Ice: warning, something printed on fd 1\\n")
        elif action == "wrong-id":  # well-formed, but for another question
            answer["id"] = -1
            sys.stdout.write(json.dumps(answer) + "\\n")
        elif action == "fatal":
            answer["fatal"] = "cannot import omeroweb.settings: ImportError: no"
            sys.stdout.write(json.dumps(answer) + "\\n")
        elif action == "hang":
            # Answers, but far too late: a reused process would hand this to the next question.
            time.sleep(float(plan[-1]) if isinstance(plan[-1], (int, float)) else 3)
            sys.stdout.write(json.dumps(answer) + "\\n")
        elif action == "die":
            sys.exit(3)
        else:
            sys.stdout.write(json.dumps(answer) + "\\n")
        sys.stdout.flush()
    """
)


@pytest.fixture
def fake_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A venv that passes layout_problems, whose probe is FAKE_PROBE; (venv, state dir)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    site = venv / "lib" / "python3.10" / "site-packages"
    for package in ("omeroweb", "gunicorn"):
        (site / package).mkdir(parents=True)
    state = tmp_path / "state"
    state.mkdir()
    script = tmp_path / "fake_probe.py"
    script.write_text(FAKE_PROBE)
    monkeypatch.setattr(venv_module, "_probe_command", lambda v: [sys.executable, str(script), str(state)])
    # The "died" path explains itself with a one-shot run; the fake has no one-shot mode.
    monkeypatch.setattr(venv_module, "probe_sync", lambda *a, **k: (_ for _ in ()).throw(ConfigError("probe died")))
    return venv, state


def plan(state: Path, *actions: object) -> None:
    (state / "plan.json").write_text(json.dumps(list(actions)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (it is reaped in the background).
    return ") Z " not in Path(f"/proc/{pid}/stat").read_text()


def test_garbage_and_hang_are_never_reused_out_of_step(fake_venv):
    venv, state = fake_venv
    plan(state, "good", "garbage", "hang", "good", "good", 30)

    async def scenario() -> None:
        prober = Prober(timeout=2.0)
        try:
            first = await prober.probe(venv, {"q": "1"})
            assert first.versions["q"] == "1"
            pid_a = int(first.versions["pid"])

            with pytest.raises(ConfigError, match="not its answer; it is restarted"):
                await prober.probe(venv, {"q": "2"})
            # The process that printed garbage is gone, not kept for the next question.
            await _until(lambda: not alive(pid_a))

            with pytest.raises(ConfigError, match="did not answer within 2s"):
                await prober.probe(venv, {"q": "3"})
            pid_b = int((state / "asked").read_text().split()[2])
            assert pid_b != pid_a
            await _until(lambda: not alive(pid_b))

            # A fresh process answers the new question, not the hung one's late answer to 3.
            fourth = await prober.probe(venv, {"q": "4"})
            assert fourth.versions["q"] == "4"
            pid_c = int(fourth.versions["pid"])
            assert pid_c not in (pid_a, pid_b)

            # In step again: the warm process is reused.
            fifth = await prober.probe(venv, {"q": "5"})
            assert fifth.versions == {"pid": str(pid_c), "q": "5"}
        finally:
            await prober.close()
        assert not alive(pid_c)

    asyncio.run(scenario())


def test_an_answer_to_another_question_or_a_fatal_one_restarts_the_probe(fake_venv):
    venv, state = fake_venv
    plan(state, "wrong-id", "fatal", "good")

    async def scenario() -> None:
        prober = Prober(timeout=10.0)
        try:
            with pytest.raises(ConfigError, match="not its answer"):
                await prober.probe(venv, {"q": "1"})
            with pytest.raises(ConfigError, match="cannot import omeroweb.settings"):
                await prober.probe(venv, {"q": "2"})
            good = await prober.probe(venv, {"q": "3"})
            assert good.versions["q"] == "3"
        finally:
            await prober.close()
        pids = (state / "asked").read_text().split()
        assert len(set(pids)) == 3, pids  # each failure cost its process

    asyncio.run(scenario())


def test_a_question_cancelled_while_waiting_kills_the_probe(fake_venv):
    venv, state = fake_venv
    plan(state, "hang", "good", 3)

    async def scenario() -> None:
        prober = Prober(timeout=60.0)
        try:
            asking = asyncio.create_task(prober.probe(venv, {"q": "1"}))
            await _until(lambda: (state / "asked").exists())
            hung = int((state / "asked").read_text().split()[0])
            asking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asking
            await _until(lambda: not alive(hung))
            answer = await prober.probe(venv, {"q": "2"})
            assert answer.versions["q"] == "2" and int(answer.versions["pid"]) != hung
        finally:
            await prober.close()

    asyncio.run(scenario())


def test_a_probe_that_dies_is_replaced(fake_venv):
    venv, state = fake_venv
    plan(state, "die", "good")

    async def scenario() -> None:
        prober = Prober(timeout=10.0)
        try:
            with pytest.raises(ConfigError, match="probe died"):
                await prober.probe(venv, {"q": "1"})
            assert (await prober.probe(venv, {"q": "2"})).versions["q"] == "2"
        finally:
            await prober.close()

    asyncio.run(scenario())


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_the_probe_is_asked_to_yield_the_cpu_in_a_session_of_its_own_once_the_site_serves(fake_venv):
    """Once the first generation serves, the kept probe runs beside its workers (a start on a remembered answer
    asks the venv again then; a reload beside a busy site): it is its own session's leader, told to lower itself
    to PROBE_NICE above the daemon's own nice value (venv_probe.lower_priority: with autogroups, only its own
    session's group can be lowered). Before that, on a start that asks the venv first, the site waits for it."""
    venv, state = fake_venv
    plan(state, "good", "good")

    async def scenario() -> list[tuple[list[str], bool]]:
        prober = Prober(timeout=30.0)
        seen = []
        try:
            for serving in (False, True):
                prober.site_serves = serving
                pid = int((await prober.probe(venv, {"q": "1"})).versions["pid"])
                seen.append((Path(f"/proc/{pid}/cmdline").read_text().split("\0"), os.getsid(pid) == pid))
                await prober.close()  # the next question starts a fresh process
        finally:
            await prober.close()
        return seen

    (cold, cold_leader), (beside, leader) = asyncio.run(scenario())
    assert "--serve" in cold and "--nice" not in cold and cold_leader
    assert beside[beside.index("--nice") + 1] == str(venv_module.probe_nice()) and leader


def _lower(nice: int, own_session: bool) -> list[str]:
    """Run venv_probe.lower_priority(nice) in a child as the daemon's probe runs (by path, not as a module);
    its nice value and its session group's nice afterwards."""
    code = ("import os, runpy, sys; probe = runpy.run_path(sys.argv[1], run_name='probe');"
            "probe['lower_priority'](int(sys.argv[2])); print(os.getpriority(os.PRIO_PROCESS, 0));"
            "group = '/proc/self/autogroup'; os.path.exists(group) or print('-');"  # a kernel without autogroups
            "os.path.exists(group) and print(open(group).read().partition(' nice ')[2].strip() or '-')")
    done = subprocess.run([sys.executable, "-c", code, str(venv_module.PROBE), str(nice)], capture_output=True,
                          text=True, timeout=60, start_new_session=own_session)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_probe_lowers_its_own_session_group_only_as_its_leader():
    """The probe lowers itself, never the daemon by pid (only the process knows its pid is still its own). With
    autogroups a nice value ranks it only inside its session's group, which competes with gunicorn's as an equal:
    as its own session's leader it lowers that group too; in someone else's session it leaves the group as it is."""
    nice = venv_module.probe_nice()
    assert nice > 0, "the test runs at a nice value that leaves the probe at 0: nothing would be lowered"
    group = autogroup_nice()
    own = _lower(nice, own_session=True)
    assert own[0] == str(nice)
    if group is not None:  # a kernel with autogroups, and this process in one
        # At least 10: a new session's group (gunicorn's) starts at 0, whatever the daemon's nice value.
        assert own[1] == str(max(nice, 10))
    shared = _lower(nice, own_session=False)
    assert shared[0] == str(nice)
    assert autogroup_nice() == group
