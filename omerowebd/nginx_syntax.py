"""nginx value syntax: what may stand in a directive of the files root's nginx reads.

Every value that lands in nginx text is checked here first (nothing in it
may end a directive or a block), and so is every address: gunicorn's binds
become nginx's upstream servers, so one rule says what an address is, for
daemon.bind, nginx.upstreams and nginx.listen alike. A leaf module: it
imports nothing of omerowebd, so config.py (which checks the [nginx] table
with it) and nginx.py (which renders) both use it without an import circle.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

_ENDS = {
    ";": "which ends an nginx directive",
    "{": "which opens an nginx block",
    "}": "which closes an nginx block",
    '"': "which nginx reads as a quote",
    "'": "which nginx reads as a quote",
}


def value_problem(value: str, *, words: bool = False, backslash: bool = False) -> str | None:
    """Why ``value`` cannot stand unquoted in an nginx directive, or None.

    ``words``: several words are fine (``listen 443 ssl``, ``server_name a b``).
    ``backslash``: a backslash is fine inside a word (regex server names).
    """
    if not value.strip():
        return "is empty"
    for ch in value:
        if ch in "\r\n":
            return "contains a line break"
        if ch in _ENDS:
            return f"contains {ch!r}, {_ENDS[ch]}"
        if (ord(ch) < 32 and ch != " ") or ord(ch) == 127:
            return f"contains the control character {ch!r}"
    if not words and any(c.isspace() for c in value):
        return "contains a space: nginx would read two values"
    if any(word.startswith("#") for word in value.split()):
        return "has a word starting with '#', which nginx reads as a comment"
    if "\\" in value:
        if not backslash:
            return "contains a backslash, which nginx reads as an escape"
        if re.search(r"\\(\s|$)", value):
            return "ends a word with a backslash, which would escape what follows"
    return None


# \Z, not $: "$" also matches before a final newline ("1m\n" would pass).
_SIZE = re.compile(r"^[0-9]+[kKmMgG]?\Z")
# nginx times (ngx_parse_time): "30", "10s", "1m30s"; "ms" only where milliseconds count.
_SECONDS = re.compile(r"^(?:[0-9]+[smhdwMy]?)+\Z")
_TIME = re.compile(r"^(?:[0-9]+(?:ms|[smhdwMy])?)+\Z")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\Z")


def settings_problems(nginx: Any) -> list[tuple[str, str]]:
    """(key, message) for every value of the [nginx] table (a config.NginxSettings) that cannot go into nginx text.

    config.py reports them; the table is not imported here, so that config.py can ask without an import circle.
    """
    out: list[tuple[str, str]] = []

    def check(key: str, value: str, **how: bool) -> None:
        problem = value_problem(value, **how)
        if problem:
            out.append((key, f"{value!r} {problem}"))

    check("listen", nginx.listen, words=True)
    if not out:
        problem = listen_problem(nginx.listen)
        if problem:
            out.append(("listen", f"has {problem}"))
    check("server_name", nginx.server_name, words=True, backslash=True)
    if not _SIZE.match(nginx.max_body_size):
        out.append(("max_body_size",
                    f"must be an nginx size such as '0', '512k', '100m' or '2g', not {nginx.max_body_size!r}"))
    for key in ("server_file", "location_file"):
        name = getattr(nginx, key)
        if not _FILE_NAME.match(name) or name in (".", ".."):
            out.append((key, f"must be a plain file name (letters, digits, '._+-'), not {name!r}"))
    if nginx.server_file == nginx.location_file:
        out.append(("location_file", "must differ from nginx.server_file"))
    if nginx.output_dir is not None:
        check("output_dir", str(nginx.output_dir))
    for path, target in nginx.redirects.items():
        problem = value_problem(path) or value_problem(target)
        if problem:
            out.append(("redirects", f"{path!r} = {target!r}: {problem}"))
        elif not path.startswith("/"):
            out.append(("redirects", f"{path!r}: a path must start with '/'"))
        elif not target.startswith(("/", "http://", "https://")):
            out.append(("redirects", f"{path!r} = {target!r}: the target must start with '/', http:// or https://"))
    for address in nginx.upstreams:
        if address_problem(address):
            out.append(("upstreams", f"has {address!r}: use HOST:PORT, [IPV6]:PORT or unix:/absolute/path"))
    if not 0 <= nginx.max_fails <= 1000:
        out.append(("max_fails", f"must be from 0 (never take a backend out) to 1000, not {nginx.max_fails}"))
    if not _SECONDS.match(nginx.fail_timeout):
        out.append(("fail_timeout", f"must be an nginx time in seconds such as '10s', '30' or '1m',"
                                    f" not {nginx.fail_timeout!r}"))
    if not _TIME.match(nginx.connect_timeout) or not nginx.connect_timeout.strip("0msh"):
        out.append(("connect_timeout", f"must be an nginx time above 0 such as '5s', '500ms' or '1m',"
                                       f" not {nginx.connect_timeout!r}"))
    for key in ("validate_command", "reload_command"):
        command = getattr(nginx, key)
        if command is not None and (not command or not command[0]):
            out.append((key, "must name a program, e.g. [\"nginx\", \"-t\"]; leave it out for none"))
    return out


_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes, one of them the terminating NUL


def port_problem(text: str) -> str | None:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        return f"the port must be a number from 1 to 65535, not {text!r}"
    return None


def host_problem(host: str) -> str | None:
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1] if host.endswith("]") else "!")
        except ValueError:
            return f"{host!r} is not an IPv6 address in brackets ([::1])"
        return None
    if not _HOST.fullmatch(host):
        return f"{host!r} is not a host name or IPv4 address (IPv6 goes in brackets: [::1])"
    if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
        return f"{host!r} is not a host name: at most 253 characters, 63 between dots"
    return None


def address_problem(address: str) -> str | None:
    """Why ``address`` is not HOST:PORT, [IPV6]:PORT or unix:/absolute/path, or None."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            return f"{address!r}: a unix socket path must be absolute (unix:/run/omero-web.sock)"
        problem = value_problem(path)
        if problem:  # it becomes an nginx upstream server: nothing in it may end a directive
            return f"{address!r}: the unix socket path {problem}"
        if len(path.encode()) > UNIX_PATH_MAX:
            return f"{address!r}: a unix socket path may be at most {UNIX_PATH_MAX} bytes long"
        return None
    host, colon, port = address.rpartition(":")
    if not colon or not host or (":" in host and not host.startswith("[")):
        return f"{address!r} is not an address: use HOST:PORT, [IPV6]:PORT or unix:/absolute/path"
    problem = host_problem(host) or port_problem(port)
    return f"{address!r}: {problem}" if problem else None


def host_and_port(address: str) -> tuple[str, int]:
    """(host without brackets, port) of a TCP address ``address_problem`` accepts. ValueError otherwise."""
    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


# nginx's `listen` parameters (ngx_http_core_module); those with "=" take a value.
_LISTEN_FLAGS = {"default_server", "default", "ssl", "http2", "quic", "proxy_protocol", "deferred", "bind", "reuseport"}
_LISTEN_OPTIONS = {"setfib", "fastopen", "backlog", "rcvbuf", "sndbuf", "accept_filter", "ipv6only", "so_keepalive"}


def listen_address(listen: str) -> tuple[str | None, str] | None:
    """(host, port) of nginx's ``listen`` value: host None for every address, port "80" where it names none;
    None for a unix socket or an empty value."""
    words = listen.split()
    if not words or words[0].startswith("unix:"):
        return None
    first = words[0]
    if first.isdigit():
        return None, first
    if first.startswith("[") and first.endswith("]"):
        return first, "80"
    host, colon, port = first.rpartition(":")
    return (host, port) if colon else (first, "80")  # an address alone: nginx listens on port 80


def listen_problem(listen: str) -> str | None:
    """Why ``listen`` is not what nginx's ``listen`` takes (PORT, ADDRESS[:PORT] or unix:/path, then flags)."""
    words = listen.split()
    if not words:
        return "is empty: give a port such as 80, or ADDRESS:PORT"
    first, flags = words[0], words[1:]
    address = listen_address(listen)
    if address is None:
        problem = address_problem(first)
        if problem:
            return problem
    else:
        host, port = address
        problem = (None if host in (None, "*") else host_problem(host)) or port_problem(port)
    if problem:
        return f"{listen!r}: {problem}"
    for flag in flags:
        name, eq, value = flag.partition("=")
        if (flag not in _LISTEN_FLAGS and name not in _LISTEN_OPTIONS) or (name in _LISTEN_OPTIONS and not value):
            return (f"{listen!r}: {flag!r} is not a parameter of nginx's listen"
                    " (such as ssl, http2, default_server, reuseport, backlog=N)")
    return None
