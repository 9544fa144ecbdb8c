"""names.py: one style for naming keys and suggesting the one meant."""

from __future__ import annotations

from omerowebd.names import closest, did_you_mean, shown


def test_a_suggestion_is_quoted():
    assert did_you_mean("ready_timout", ["ready_timeout", "venv"]) == " (did you mean 'ready_timeout'?)"
    assert did_you_mean("daemon.vnev", ["daemon.venv", "nginx.listen"]) == " (did you mean 'daemon.venv'?)"


def test_nothing_close_suggests_nothing():
    assert did_you_mean("zzzz", ["ready_timeout", "venv"]) == ""
    assert closest("zzzz", []) is None


def test_a_stricter_cutoff_suggests_less():
    choices = ["omero.web.wsgi_workers"]
    assert closest("omero.web.wsgi_worker", choices, cutoff=0.8) == "omero.web.wsgi_workers"
    assert closest("omero.web.apps", choices, cutoff=0.8) is None


def test_a_key_is_named_as_written_when_plain_and_quoted_otherwise():
    assert shown("ready_timeout") == "ready_timeout"
    assert shown("omero.web.prefix") == "omero.web.prefix"
    assert shown("two words") == "'two words'"
    assert shown("line\nbreak") == "'line\\nbreak'"  # one line, always
