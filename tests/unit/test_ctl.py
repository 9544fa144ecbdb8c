"""omerowebctl's parser: every command listed, only the chosen one's module imported."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from omerowebd import ctl

ROOT = Path(__file__).resolve().parents[2]


def listed(parser: argparse.ArgumentParser) -> dict[str, str]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {choice.dest: choice.help for choice in sub._choices_actions}


def test_the_table_says_what_each_module_says():
    """--help lists the table's lines: they must be the modules' own, in the table's order."""
    assert listed(ctl.build_parser()) == ctl.COMMANDS
    assert list(listed(ctl.build_parser())) == list(ctl.COMMANDS)
    for name in ctl.COMMANDS:
        assert listed(ctl.build_parser(only=name)) == ctl.COMMANDS


def commands_imported(*argv: str) -> tuple[list[str], str]:
    script = (
        "import sys\n"
        "from omerowebd import ctl\n"
        "try:\n"
        f"    ctl.main({list(argv)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('imported:', *sorted(m for m in sys.modules if m.startswith('omerowebd.commands.')), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return done.stderr.strip().splitlines()[-1].split()[1:], done.stdout


@pytest.mark.parametrize("name", ["reload", "status", "config"])
def test_only_the_chosen_command_is_imported(name):
    imported, shown = commands_imported("--socket", "/nonexistent.sock", name, "--help")
    expected = {"config": ["omerowebd.commands.config", "omerowebd.commands.reload"]}  # config imports reload
    assert imported == expected.get(name, [f"omerowebd.commands.{name}"])
    assert f"usage: omerowebctl {name}" in shown


def test_top_level_help_lists_every_command_and_imports_none():
    imported, shown = commands_imported("--help")
    assert imported == []
    for name, line in ctl.COMMANDS.items():
        assert f"{name}" in shown and line.split()[0] in shown


def test_usage_errors_stay_what_they_were(capsys):
    for argv, message in ([[], "required: COMMAND"], [["bogus"], "invalid choice: 'bogus'"],
                          [["status", "--bad"], "unrecognized arguments: --bad"],
                          [["--config"], "expected one argument"]):
        with pytest.raises(SystemExit) as exited:
            ctl.main(argv)
        assert exited.value.code == 2
        assert message in capsys.readouterr().err


def test_a_command_gets_its_arguments_after_the_top_level_options():
    parser = ctl.build_parser(only=ctl.chosen_command(["--socket", "/x.sock", "rollout", "--ssh", "web1"]))
    args = parser.parse_args(["--socket", "/x.sock", "rollout", "--ssh", "web1"])
    assert args.command == "rollout" and args.socket == "/x.sock"


def test_a_reload_leaves_the_daemons_logging_unimported():
    """structlog and the journal are the daemon's; a reload logs nothing (omerowebctl's own start-up is its share)."""
    script = ("import sys\nfrom omerowebd import ctl\ntry:\n    ctl.main(['reload', '--help'])\nexcept SystemExit:\n"
              "    pass\nprint('imported:', *[m for m in ('structlog', 'systemd.journal') if m in sys.modules], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "imported:"
