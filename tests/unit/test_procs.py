"""procs.py: signalling a child, or the process group it leads."""

from __future__ import annotations

import signal
import subprocess
import sys

from omerowebd.procs import signal_group

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
           "print('ready', flush=True); time.sleep(120)"]


def grandchildren(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != pid]


def test_the_group_goes_and_the_leader_alone_goes_alone():
    leader = subprocess.Popen(SLEEPER, start_new_session=True, stdout=subprocess.PIPE, text=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline() == "ready\n"
        members = grandchildren(leader.pid)
        assert len(members) == 1

        signal_group(leader.pid, signal.SIGTERM, group=False)
        assert leader.wait(timeout=60) == -signal.SIGTERM
        assert grandchildren(leader.pid) == members  # its child lives on in the group

        signal_group(leader.pid, signal.SIGKILL)  # the group: the leader's pid names it still
        for _ in range(600):
            if not grandchildren(leader.pid):
                break
            subprocess.run(["sleep", "0.1"])
        assert grandchildren(leader.pid) == []
    finally:
        signal_group(leader.pid, signal.SIGKILL)
        leader.wait(timeout=60)


def test_a_process_that_is_gone_or_no_pid_is_no_error():
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    done.wait(timeout=60)
    signal_group(done.pid, signal.SIGTERM)
    signal_group(done.pid, signal.SIGTERM, group=False)
    signal_group(None, signal.SIGTERM)
    signal_group(0, signal.SIGTERM)  # never "my own group"
