"""The sweep's unlink helper (session_sweep.Unlinker): a process forked from the sweep that
unlinks only what the sweep judged, only while it is still that version, reports exactly,
and never outlives the sweep."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from omerowebd import session_sweep as sweep_script
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]


def a_sweep(store: Path) -> sweep_script.Sweep:
    snapshot = {"use_tz": True, "cookie_age": 60, "serializer": sweep_script.JSON_SERIALIZERS[0]}
    job = sweep_script.Sweep(-1, snapshot, None, dry_run=True, use_ledger=False)
    job.dfd = sweep_script.open_store(str(store))
    return job


def gone(pid: int) -> bool:
    """Exited (or a zombie nobody reaped yet: it runs nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_helper_rechecks_after_the_verdict_it_was_sent(tmp_path: Path) -> None:
    """A save between the verdict and the helper's unlink keeps the session: the helper looks again."""
    names = [f"sessionid{c * 32}" for c in "abcdefgh"]
    for name in names:
        (tmp_path / name).write_text("x")
    stats = {name: os.stat(tmp_path / name) for name in names}
    job = a_sweep(tmp_path)
    try:
        unlinker = sweep_script.Unlinker(job, threads=1)
        newer = tmp_path / "newer"
        newer.write_text("a request saved it again")
        os.replace(newer, tmp_path / names[0])
        for name in names:
            unlinker.put(name, stats[name])
        unlinker.flush()
        unlinker.close()
    finally:
        os.close(job.dfd)
    assert sorted(os.listdir(tmp_path)) == [names[0]]
    c = job.counts
    assert (c["deleted"], c["changed"], c["kept"], c["errors"]) == (7, 1, 1, 0)


def test_an_unlink_error_is_counted_and_sampled(tmp_path: Path) -> None:
    (tmp_path / ("sessionid" + "d" * 32)).mkdir()  # unlink() says EISDIR, whoever we are
    (tmp_path / ("sessionid" + "e" * 32)).write_text("x")
    job = a_sweep(tmp_path)
    try:
        unlinker = sweep_script.Unlinker(job, threads=2)
        for name in sorted(os.listdir(tmp_path)):
            unlinker.put(name, os.stat(tmp_path / name))
        unlinker.close()
    finally:
        os.close(job.dfd)
    assert os.listdir(tmp_path) == ["sessionid" + "d" * 32]
    assert (job.counts["deleted"], job.counts["errors"]) == (1, 1)
    [sample] = job.error_samples
    assert sample.startswith("session file sha256:%s: cannot delete: " % sweep_script.name_hash("sessionid" + "d" * 32))
    assert "d" * 32 not in sample  # a key is a login: never in a report


def test_a_helper_that_dies_is_counted_as_errors(tmp_path: Path) -> None:
    names = [f"sessionid{c * 32}" for c in "abc"]
    for name in names:
        (tmp_path / name).write_text("x")
    job = a_sweep(tmp_path)
    try:
        unlinker = sweep_script.Unlinker(job, threads=1)
        os.kill(unlinker.pid, signal.SIGKILL)
        for name in names:
            unlinker.put(name, os.stat(tmp_path / name))
        unlinker.close()  # no hang, no exception: the sweep reports
    finally:
        os.close(job.dfd)
    assert job.counts["deleted"] == 0 and job.counts["errors"] == 3
    assert job.error_samples == ["the unlink helper ended (signal 9) without its report: 3 expired sessions "
                                 "handed to it are not accounted for"]
    assert len(os.listdir(tmp_path)) == 3


SWEEP_THAT_HANGS = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    from omerowebd import session_sweep as s
    os.nice(7)
    job = s.Sweep(s.open_store(sys.argv[2]), {"use_tz": True, "cookie_age": 60, "serializer": s.JSON_SERIALIZERS[0]},
                  None, dry_run=True, use_ledger=False)
    unlinker = s.Unlinker(job)
    print(unlinker.pid, flush=True)
    time.sleep(3600)
""")


def test_the_helper_dies_with_the_sweep_and_keeps_its_priority(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SWEEP_THAT_HANGS, str(ROOT), str(tmp_path)],
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        helper = int(proc.stdout.readline())
        fields = Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[1]) == proc.pid  # ppid: a fork of the sweep
        assert int(fields[16]) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)  # nice: inherited, lowered
        assert os.stat(f"/proc/{helper}").st_uid == os.getuid()
        os.kill(proc.pid, signal.SIGKILL)  # the sweep alone: no close(), no pipe end written
        proc.wait(30)
        wait_for(lambda: gone(helper), timeout=30, what="the helper to die with the sweep")
        # It let go of the sweep's stdout: the daemon, reading it to its end, is not kept waiting.
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stdout.close()


def test_the_prefetcher_is_the_sweeps_child_only_reads_and_ends_with_its_window(tmp_path: Path) -> None:
    """(What it warms is measured by bench/sessions_sweep.py's cold rows, not here.)"""
    names = [f"sessionid{i:032d}" for i in range(40)]
    for name in names:
        (tmp_path / name).write_text("x")
    window = sorted((os.stat(tmp_path / name).st_ino, name) for name in names)
    job = a_sweep(tmp_path)
    try:
        prefetcher = sweep_script.Prefetcher(job, window, 0)
        helper = prefetcher.pid
        fields = Path(f"/proc/{helper}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(fields[1]) == os.getpid()
        # A sweep that stops part way (stopped, timed out) kills it, whatever it is doing.
        prefetcher.close()
        assert prefetcher.pid is None and gone(helper)
    finally:
        os.close(job.dfd)
    assert sorted(os.listdir(tmp_path)) == names  # it only reads


def test_a_full_buffer_sent_mid_batch_keeps_the_pacing(tmp_path: Path) -> None:
    """The site was busy at the last batch: verdicts sent because the buffer filled, before the
    batch's own flush, must not tell the helper it may unlink with every thread again."""
    job = a_sweep(tmp_path)
    try:
        unlinker = sweep_script.Unlinker(job, threads=2)
        unlinker.flush(busy=True)
        stat = os.stat(tmp_path)
        for i in range(400):  # more than one buffer's worth of verdicts for files that are not there
            unlinker.put(f"sessionid{i:032d}", stat)
        assert unlinker.busy[0] == 1
        unlinker.flush(busy=False)
        assert unlinker.busy[0] == 0
        unlinker.close()
    finally:
        os.close(job.dfd)
    assert job.counts["deleted"] == 0 and job.counts["errors"] == 0
