"""Root's side of the nginx hand-over: render nginx's files from what root owns.

nginx's master process reads what it includes as root. The daemon runs as
the service user (omero-web), which must be assumed compromised: nothing it
writes may become part of nginx's configuration, and root must not even
parse it. So ``omerowebd-nginx.service`` (root) runs this, and it renders the
files itself, with the daemon's own rendering code (:func:`nginx.render_outputs`),
from root-owned inputs only:

* the TOML (``/etc/omerowebd/omerowebd.toml``), refused unless root alone can
  change it and every directory above it;
* omero-web's templates and defaults, from the venv the TOML names, probed
  (``python -I``, a clean environment) only once :func:`trust.venv_problems`
  finds nothing in it that anyone but root can change;
* where gunicorn listens: the socket unit's ``ListenStream=`` (asked of
  root's systemd), else the TOML's ``daemon.bind`` or OMERO.web's
  application_server host and port, as the daemon works it out.

The one thing it reads from the service user is the daemon's marker
(``STATE_DIR/nginx/applied.json``), and only to compare the digest in it
with the digest of the TOML read here: equal means the daemon serves this
TOML, so nginx may follow; anything else (missing, different, a link, a FIFO,
huge, garbage) means "not now". The worst the service user can do is make
root publish what the admin's TOML says, or nothing.

Root keeps its own record of what it last published (``.published.json``
in the destination, 0600): the inputs' digests and the files' hashes. A
flood of path events then costs a comparison each, not a probe and an nginx
reload. Published config files are 0600 root (nginx's master reads them);
the maintenance page is 0644 in a 0755 directory (nginx's workers serve it).
After writing, ``nginx -t``; if nginx refuses, the previous files come back
and only nginx's own first error line is printed. Then nginx is reloaded.

Every run, whatever it found, waits a second and looks again, until a look
finds nothing new. systemd's path unit does not watch while this runs, so
that second look is what picks up a change that arrived meanwhile; and it
makes a flood of path events start at most one run a second, so the unit
needs no start limit (which the service user could otherwise trip to switch
publishing off) and the path unit's trigger limit stays out of reach.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__, desired, nginx, trust
from .config import DEFAULT_CONFIG, Config, parse
from .errors import UserError
from .exits import EXIT_OK, PUBLISH_FAILED, PUBLISH_REFUSED
from .venv import PROBE, PROBE_TIMEOUT, VenvInfo, _parse_probe, _probe_input, fingerprint, layout_problems, python_of

DEFAULT_DEST = Path("/var/lib/omerowebd-nginx")
SOCKET_UNIT = "omerowebd.socket"
NGINX_TEST = ("/usr/sbin/nginx", "-t", "-q")
# Reload only a running nginx: starting it is the admin's decision.
NGINX_RELOAD = ("/usr/bin/systemctl", "try-reload-or-restart", "nginx.service")
MAINTENANCE_DIR = "maintenance"
RECORD = ".published.json"
# Every run lasts at least this long, then looks at its inputs again: systemd's
# path unit does not watch while this runs, so a change that lands meanwhile
# is seen only by that second look; and a flood of path events starts at most
# one run a second, whatever each run finds.
SETTLE = 1.0
ROUNDS = 3  # publishing (probe, nginx -t, reload) at most this often per run; looking is cheap
DEADLINE = 120.0  # no new look after this many seconds (the unit's TimeoutStartSec covers one more round)
COMMAND_TIMEOUT = 60.0
MAX_TOML = 1 << 20
MAX_MARKER = 4096
# Nothing of the caller's environment reaches the venv's Python or nginx.
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

EXIT_FAILED, EXIT_REFUSED = PUBLISH_FAILED, PUBLISH_REFUSED


class Refused(Exception):
    """One line for the journal; the exit status that goes with it."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Options:
    config: Path = DEFAULT_CONFIG
    dest: Path = DEFAULT_DEST
    socket_unit: str | None = SOCKET_UNIT  # None: no systemd to ask
    test_command: tuple[str, ...] | None = NGINX_TEST
    reload_command: tuple[str, ...] | None = NGINX_RELOAD
    force: bool = False  # ignore the record: render, test and reload even if nothing changed
    rounds: int = ROUNDS
    settle: float = SETTLE


@dataclass(frozen=True)
class Inputs:
    """Everything the published files are made from, read cheaply (no probe)."""

    config: Config
    backends: tuple[str, ...]
    packages: str  # the venv's fingerprint
    template: str | None  # sha256 of nginx.maintenance_template, when the TOML names one

    def key(self) -> dict[str, Any]:
        return {
            "toml": self.config.digest,
            "venv": str(self.config.daemon.venv),
            "packages": self.packages,
            "backends": list(self.backends),
            "template": self.template,
            "omerowebd": __version__,
        }


# -- the inputs -----------------------------------------------------------------


def read_config(path: Path) -> Config:
    """The TOML, if root alone can change it (and every directory above it)."""
    if not os.path.lexists(path):
        raise Refused(f"{path}: config file not found (pass --config); nothing published")
    problems = trust.file_problems(path, "config file")
    if problems:
        raise Refused(f"{problems[0]}: root renders nginx's files only from a file root alone can change"
                      f" (chown root: {path} && chmod go-w {path})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Refused(f"{path}: cannot open the config file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        # Again on what was opened: the path's check and the open are two steps.
        if not stat.S_ISREG(st.st_mode) or _writable_by_others(st):
            raise Refused(f"{path}: not a regular file that root alone can change (chown root: {path}"
                          f" && chmod go-w {path})")
        data = f.read(MAX_TOML + 1)
    if len(data) > MAX_TOML:
        raise Refused(f"{path}: larger than {MAX_TOML} bytes: not a config file")
    return parse(data, path)


def _writable_by_others(st: os.stat_result) -> bool:
    return st.st_uid != 0 or bool(st.st_mode & stat.S_IWOTH) or bool(st.st_mode & stat.S_IWGRP and st.st_gid != 0)


def applied_digest(directory: Path) -> str | None:
    """The TOML digest in the daemon's marker, or None for anything but a small regular file saying one.

    The service user owns the directory: a symbolic link (the directory or
    the file), a FIFO, a device, a huge or malformed file all give None, and
    nothing of it is ever printed.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        dir_fd = os.open(directory, flags | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fd = os.open(nginx.APPLIED_MARKER, flags | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_MARKER + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_MARKER:
        return None
    try:
        marker = json.loads(data)
    except (ValueError, RecursionError):
        return None
    digest = marker.get("digest") if isinstance(marker, dict) else None
    return digest if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) else None


def socket_addresses(unit: str) -> list[str] | None:
    """Where the socket unit listens, as nginx addresses; None when there is no such unit (or no systemd).

    The daemon takes its sockets from this unit whenever systemd passes them
    (the service requires it), and then tells nginx exactly these.
    """
    try:
        done = subprocess.run(
            ["systemctl", "show", "--property=LoadState", "--property=Listen", "--", unit],
            capture_output=True, text=True, env=CLEAN_ENV, stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_listen(done.stdout)


def parse_listen(text: str) -> list[str] | None:
    """``systemctl show -p LoadState -p Listen`` output -> nginx addresses (stream sockets only)."""
    loaded = False
    addresses = []
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "LoadState":
            loaded = value.strip() == "loaded"
        elif key == "Listen":
            address, _, kind = value.strip().rpartition(" ")
            if kind != "(Stream)" or not address:
                continue
            if address.startswith("/"):
                addresses.append("unix:" + address)
            elif not address.startswith("@"):  # nginx cannot reach an abstract socket by name
                addresses.append(address)
    return addresses if loaded and addresses else None


def backends(config: Config, socket_unit: str | None) -> tuple[str, ...]:
    listening = socket_addresses(socket_unit) if socket_unit else None
    return desired.backends_of(config, listening or ())


def template_digest(config: Config) -> str | None:
    path = config.nginx.maintenance_template
    if path is None:
        return None
    problems = trust.file_problems(path, "maintenance template")
    if problems:
        raise Refused(f"{config.path}: nginx.maintenance_template: {problems[0]}; root reads only files root"
                      f" alone can change (chown root: {path} && chmod go-w {path})")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise Refused(f"{config.path}: nginx.maintenance_template {path}: {e.strerror}") from None


@dataclass(frozen=True)
class Wait:
    """Nothing to publish now, and why (one line)."""

    reason: str


def gather(options: Options) -> Inputs | Wait:
    config = read_config(options.config)
    if not config.nginx.enabled:
        return Wait(f"nginx.enabled is false in {config.path}: nothing to publish")
    marker = nginx.output_dir(config) / nginx.APPLIED_MARKER
    if applied_digest(marker.parent) != config.digest:
        return Wait(f"the daemon does not serve {config.path} as it is now (see {marker}): nothing published yet")
    return Inputs(
        config=config,
        backends=backends(config, options.socket_unit),
        packages=fingerprint(config.daemon.venv),
        template=template_digest(config),
    )


# -- the venv, as root ----------------------------------------------------------


def probe(config: Config) -> VenvInfo:
    """What the venv's OMERO.web says (templates, defaults), asked as root: only of a venv root alone controls."""
    venv = config.daemon.venv
    problems = trust.venv_problems(venv) if venv.is_dir() else []
    if problems:
        raise Refused(f"{config.path}: daemon.venv: {problems[0]}; root runs only a venv root alone can change"
                      f" (chown -R root:root {venv} && chmod -R go-w {venv}); nothing published")
    problems = layout_problems(venv)
    if problems:
        raise Refused(f"{config.path}: daemon.venv: {problems[0]}; nothing published")
    # -I: no PYTHONPATH, no user site, no current directory on sys.path.
    argv = [str(python_of(venv)), "-I", "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
            str(PROBE)]
    try:
        done = subprocess.run(argv, input=_probe_input(config.properties, config.daemon.omerodir),
                              capture_output=True, env=CLEAN_ENV, cwd="/", timeout=PROBE_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise Refused(f"venv {venv}: importing omeroweb.settings took over {PROBE_TIMEOUT:.0f}s", EXIT_FAILED) from None
    return _parse_probe(venv, done.returncode, done.stdout, done.stderr)


# -- the destination: a directory root alone can write ----------------------------


class Destination:
    """The published files, opened relative to directory fds that never follow links."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1
        self.page_fd = -1

    def __enter__(self) -> Destination:
        problems = trust.path_problems(self.path.parent, "directory")
        if problems:
            raise Refused(f"{self.path}: {problems[0]}")
        self.fd = _open_own_dir(None, str(self.path), self.path)
        try:
            # One publisher at a time (the unit, or an admin by hand).
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.page_fd = _open_own_dir(self.fd, MAINTENANCE_DIR, self.path / MAINTENANCE_DIR)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.page_fd, self.fd):
            if fd >= 0:
                os.close(fd)

    def _where(self, name: str) -> tuple[int, str]:
        if name.startswith(MAINTENANCE_DIR + "/"):
            return self.page_fd, name[len(MAINTENANCE_DIR) + 1:]
        return self.fd, name

    def mode(self, name: str) -> int | None:
        dir_fd, leaf = self._where(name)
        try:
            return stat.S_IMODE(os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return None

    def read(self, name: str) -> bytes | None:
        dir_fd, leaf = self._where(name)
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            return f.read()

    def write(self, name: str, data: bytes, mode: int) -> None:
        dir_fd, leaf = self._where(name)
        tmp = f".{leaf}.publish"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # not the umask's idea
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, leaf, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)

    def remove(self, name: str) -> None:
        dir_fd, leaf = self._where(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leaf, dir_fd=dir_fd)
        os.fsync(dir_fd)

    def put_back(self, previous: Mapping[str, bytes | None]) -> None:
        for name, data in previous.items():
            if data is None:
                self.remove(name)
            else:
                self.write(name, data, mode_of(name))

    def record(self) -> dict[str, Any]:
        data = self.read(RECORD)
        try:
            record = json.loads(data) if data else {}
        except ValueError:
            record = {}
        return record if isinstance(record, dict) else {}

    def save_record(self, record: Mapping[str, Any]) -> None:
        self.write(RECORD, json.dumps(record, indent=1, sort_keys=True).encode() + b"\n", 0o600)

    def hashes(self, names: Sequence[str]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for name in names:
            data = self.read(name)
            out[name] = hashlib.sha256(data).hexdigest() if data is not None else None
        return out


def _open_own_dir(parent_fd: int | None, name: str, shown: Path) -> int:
    """Open (creating it 0755) a directory that is root's, not a link, and writable by root alone."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except OSError as e:
        raise Refused(f"{shown}: cannot open it as a directory ({e.strerror}); it must be a directory"
                      " root owns, not a symbolic link") from None
    st = os.fstat(fd)
    if st.st_uid != 0 or st.st_mode & 0o022:
        os.close(fd)
        raise Refused(f"{shown} must be a directory owned by root that nobody else can write"
                      f" (chown root:root {shown} && chmod 0755 {shown})")
    if st.st_mode & 0o555 != 0o555:
        os.fchmod(fd, 0o755)  # nginx's workers read the maintenance page below it
    return fd


# -- one round ------------------------------------------------------------------


def mode_of(name: str) -> int:
    """Config files: nginx's master reads them as root, nobody else needs them. The page: the workers serve it."""
    return 0o644 if name.startswith(MAINTENANCE_DIR + "/") else 0o600


def _valid_name(name: object) -> bool:
    if not isinstance(name, str):
        return False
    leaf = name[len(MAINTENANCE_DIR) + 1:] if name.startswith(MAINTENANCE_DIR + "/") else name
    return bool(re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", leaf))


def run_command(argv: Sequence[str]) -> tuple[bool, str]:
    """(ok, the most telling line: nginx's own first error, never a file's content)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, errors="replace", env=CLEAN_ENV,
                              stdin=subprocess.DEVNULL, timeout=COMMAND_TIMEOUT, check=False)
    except OSError as e:
        return False, f"cannot run {argv[0]}: {e.strerror}"
    except subprocess.TimeoutExpired:
        return False, f"{argv[0]} did not finish within {COMMAND_TIMEOUT:.0f}s"
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    if done.returncode == 0:
        return True, "ok"
    return False, nginx.first_error(lines) or f"{argv[0]} exited with status {done.returncode}"


def publish(inputs: Inputs, options: Options, dest: Destination) -> str:
    """Render, write what changed, test, reload; one line saying what happened. Raises Refused."""
    config = inputs.config
    info = probe(config)
    properties = desired.properties_of(config)
    try:
        rendered = nginx.render_outputs(config, properties, info, list(inputs.backends),
                                        directory=dest.path, page_dir=dest.path / MAINTENANCE_DIR)
    except UserError as e:
        raise Refused(f"{e}; nothing published") from None
    for warning in rendered.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    files = {str(path.relative_to(dest.path)): data for path, data in rendered.files.items()}
    record = dest.record()
    before = [n for n in record.get("files", {}) if _valid_name(n) and n not in files]
    previous = {name: dest.read(name) for name in [*files, *before]}
    for name, data in files.items():
        if previous[name] != data or dest.mode(name) != mode_of(name):
            dest.write(name, data, mode_of(name))
    for name in before:
        dest.remove(name)
    now = dest.hashes(list(files))
    if not options.force and record.get("files") == now and record.get("reloaded"):
        dest.save_record({"inputs": inputs.key(), "files": now, "reloaded": True})
        return f"{dest.path} is up to date for {config.path}: nothing to reload"
    if options.test_command:
        ok, line = run_command(options.test_command)
        if not ok:
            dest.put_back(previous)
            raise Refused(f"nginx -t refused the files rendered from {config.path}: {line};"
                          f" the previous ones are back in {dest.path}", EXIT_FAILED)
    dest.save_record({"inputs": inputs.key(), "files": now, "reloaded": False})
    names = ", ".join(sorted(files))
    if options.reload_command:
        ok, line = run_command(options.reload_command)
        if not ok:
            raise Refused(f"published {names} to {dest.path}, but reloading nginx failed: {line}", EXIT_FAILED)
    dest.save_record({"inputs": inputs.key(), "files": now, "reloaded": True})
    return f"published {names} to {dest.path} from {config.path} (sha256 {config.digest[:12]}); nginx reloaded"


def up_to_date(inputs: Inputs, dest: Destination) -> bool:
    record = dest.record()
    files = record.get("files")
    if record.get("inputs") != inputs.key() or not record.get("reloaded") or not isinstance(files, dict):
        return False
    names = [n for n in files if _valid_name(n)]
    return len(names) == len(files) and dest.hashes(names) == files


# -- the whole run --------------------------------------------------------------


def look(options: Options) -> Inputs | Wait | Refused:
    """What there is to publish now; a refusal is an answer too (it may be gone at the next look)."""
    nginx_binary = options.test_command[0] if options.test_command else None
    if nginx_binary and os.path.isabs(nginx_binary) and not os.path.exists(nginx_binary):
        return Wait(f"nginx is not installed ({nginx_binary} is missing): nothing to publish")
    try:
        return gather(options)
    except Refused as e:
        return e
    except UserError as e:  # the TOML itself
        return Refused(f"{e}; nothing published")


def _seen(state: Inputs | Wait | Refused) -> tuple[Any, ...]:
    if isinstance(state, Inputs):
        return ("inputs", state.key())
    if isinstance(state, Refused):
        return ("refused", state.code, str(state))
    return ("wait", state.reason)


def pause(seconds: float) -> None:
    time.sleep(seconds)


def run(options: Options) -> tuple[int, list[str]]:
    """Publish, then look again after a settle time until the inputs hold still: (exit status, lines to print).

    Each look that finds something new acts on it; the run ends at the
    first look that finds nothing new, so it lasts at least ``settle``.
    Publishing itself happens only when root's inputs (the TOML, the venv,
    the addresses) differ from what was published: the service user's
    marker can only switch between "now" and "not now", which costs a look.
    """
    lines: list[str] = []
    code = EXIT_OK
    seen: tuple[Any, ...] | None = None
    published: dict[str, Any] | None = None  # the inputs this run published (or found published)
    published_code = EXIT_OK
    rounds = 0
    started = time.monotonic()
    while True:
        state = look(options)
        now = _seen(state)
        if now == seen:
            return code, lines
        seen = now
        line = None
        if isinstance(state, Refused):
            code, line = state.code, str(state)
        elif isinstance(state, Wait):
            code, line = EXIT_OK, state.reason
        elif state.key() == published:
            code = published_code  # back to what this run already published (the marker flipped)
        elif rounds >= max(1, options.rounds):
            break
        else:
            try:
                with Destination(options.dest) as dest:
                    if published is None and not options.force and up_to_date(state, dest):
                        line = f"{options.dest} is up to date for {state.config.path}"
                    else:
                        rounds += 1
                        line = publish(state, options, dest)
                code = EXIT_OK
            except Refused as e:
                code, line = e.code, str(e)
            except UserError as e:  # the venv's answer
                code, line = EXIT_REFUSED, f"{e}; nothing published"
            published, published_code = state.key(), code
        if line and line not in lines:
            lines.append(line)
        if time.monotonic() - started > DEADLINE:
            break
        pause(options.settle)
    lines.append(f"{options.config} or the daemon's state kept changing while publishing; the next change"
                 " publishes again")
    return EXIT_FAILED, lines


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="omerowebd-nginx-publish",
        description="Render omerowebd's nginx files as root from the root-owned config, test them, reload nginx.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"the daemon's TOML (default {DEFAULT_CONFIG})")
    parser.add_argument("--to", type=Path, default=DEFAULT_DEST, dest="dest",
                        help=f"where nginx includes from (default {DEFAULT_DEST})")
    parser.add_argument("--socket-unit", default=SOCKET_UNIT, help=f"the daemon's socket unit (default {SOCKET_UNIT})")
    parser.add_argument("--force", action="store_true", help="render, test and reload even if nothing changed")
    args = parser.parse_args(argv)
    return Options(config=args.config, dest=args.dest, socket_unit=args.socket_unit or None, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("omerowebd-nginx-publish: run it as root (omerowebd-nginx.service does)", file=sys.stderr)
        return EXIT_REFUSED
    code, lines = run(options)
    for line in lines:
        print(line if code == EXIT_OK else f"omerowebd-nginx-publish: {line}", file=sys.stdout if code == EXIT_OK else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
