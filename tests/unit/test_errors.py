"""errors.py: what the daemon says of a failure, in one line."""

from pathlib import Path

from omerowebd.errors import os_error_text


def test_an_os_error_is_said_with_the_file_it_is_about():
    try:
        open(Path("/nonexistent-dir/x"))
    except OSError as e:
        assert os_error_text(e) == "No such file or directory: /nonexistent-dir/x"
    assert os_error_text(OSError("plain words")) == "plain words"
    assert os_error_text(PermissionError(13, "Permission denied", "/a", None, "/b")) == "Permission denied: /a -> /b"
