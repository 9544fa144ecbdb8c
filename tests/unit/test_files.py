"""Writing an output (omerowebd/files.py): only when it changed, and never blocked by what sits at its name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from omerowebd.files import holds, write_atomic

ROOT = Path(__file__).resolve().parents[2]


def test_a_fifo_link_or_directory_where_an_output_goes_is_not_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    os.chmod(tmp_path / "file", 0o644)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dir").mkdir()
    assert holds(tmp_path / "file", b"x", 0o644)
    assert not holds(tmp_path / "file", b"x", 0o600) and not holds(tmp_path / "file", b"xy", 0o644)
    assert [holds(tmp_path / name, b"x", 0o644) for name in ("fifo", "link", "dir", "missing")] == [False] * 4


def test_writing_over_a_fifo_replaces_it_instead_of_waiting_for_a_writer(tmp_path: Path) -> None:
    """The daemon's applied marker is in the service user's directory: a FIFO left there (the system
    tests plant one) held every later reload in the marker's read."""
    marker = tmp_path / "applied.json"
    os.mkfifo(marker)
    code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from omerowebd.files import write_atomic; print(write_atomic(Path(sys.argv[2]), b'{}'))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(marker)], capture_output=True, text=True,
                          timeout=60)  # a hang is the failure; the process is killed with the timeout
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True" and marker.read_bytes() == b"{}" and marker.is_file()
    assert write_atomic(marker, b"{}") is False  # the same content again: no write
