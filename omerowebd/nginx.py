"""Who writes the nginx files: render, layer the daemon's additions, write on
change, validate, reload.

The text comes from omero-web's own templates (``omeroweb/templates/
*.conf.template`` in the site's venv), filled exactly as ``omero web config
nginx|nginx-location|nginx-development`` fills them, so that for the same
settings ``omerowebctl nginx`` prints the same bytes, and an upgrade of
omero-web brings its template fixes with it. The templates are omero-web's
files: they are read at run time, never copied into this project.

What the daemon writes is that text plus its own additions, each marked with
a comment:

* a header naming the template and the TOML file to edit;
* the maintenance location's ``root`` points at STATE_DIR/maintenance, where
  the daemon writes the page the template's ``try_files`` names (omero-web
  ships none, so without this a stopped OMERO.web is a bare 502), and the
  ``@proxy_to_app`` location sends its 502 there (the template's own
  ``error_page`` never sees it: see _route_proxy_errors_to_maintenance);
* ``nginx.upstreams`` (the other hosts): one ``server`` line each in the
  upstream block, every backend with ``max_fails``/``fail_timeout``, and
  ``proxy_next_upstream`` so that a GET meeting a dead host is served by
  another; the maintenance page then shows only when every host is down;
* ``nginx.redirects``: ``location = PATH { return 307 TARGET; }``. An exact
  match, not a prefix: a publication link is one URL, an exact location wins
  over every prefix location whatever its length, and ``"/" = "/webclient/"``
  then redirects the bare site root without shadowing the rest of the site
  (a prefix ``location /`` would clash with the template's own).

Every value that lands in nginx text is checked first: nothing in it may end
a directive or a block. The admin's ``omero.web.nginx_server_extra_config``
lines are raw nginx by design; each must be one line.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import html
import json
import os
import re
import string
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import limits
from .config import Config, NginxSettings
from .errors import UserError
from .exits import EXIT_FAILURE
from .files import holds, read_regular, write_atomic
from .nginx_syntax import listen_address, value_problem  # value_problem: also nginx.value_problem to callers
from .static import static_location
from .venv import VenvInfo, effective, probe_env

if TYPE_CHECKING:
    from .desired import Desired

# omerowebctl's names -> omero-web's template names (`omero web config TYPE`).
KINDS = {"server": "nginx", "location": "nginx-location", "development": "nginx-development"}
# `omero web config`: --http, else 8080 for nginx-development, else 80.
DEFAULT_HTTP = {"server": 80, "location": 80, "development": 8080}

MAINTENANCE_TEMPLATE = Path(__file__).with_name("maintenance.html")
MAINTENANCE_PAGE = "maintenance.html"  # used only when the template names none
COMMAND_TIMEOUT = limits.NGINX_COMMAND_TIMEOUT
REDIRECT_STATUS = 307

Where = Callable[[str], str]


def _nowhere(name: str) -> str:
    return ""


class NginxValueError(UserError):
    """A value would break the nginx text, or OMERO.web could not serve it through nginx."""


class PortConflict(UserError):
    """nginx would listen where gunicorn does (`omero web config` refuses it too)."""

    exit_code = EXIT_FAILURE


# -- what `omero web config` reads ---------------------------------------------------


@dataclass(frozen=True)
class WebSettings:
    """The OMERO.web settings the templates use, parsed as ``omeroweb.settings`` parses them."""

    root: str  # OMERODIR, as given
    application_server: str
    host: str
    port: int
    prefix: str | None  # FORCE_SCRIPT_NAME; None when unset
    prefix_property: str  # where the prefix came from, for messages
    static_url: str  # STATIC_URL (str_slash applied)
    static_root: str  # STATIC_ROOT (normpath applied)
    extra_config: tuple[str, ...]  # NGINX_SERVER_EXTRA_CONFIG

    @property
    def backend(self) -> str:
        return f"{self.host}:{self.port}"


# Properties whose text becomes whole nginx directives in what root renders.
# Every other value web_settings reads is checked (value_problem) so that it
# cannot end a directive or a block; these are nginx lines by design, so
# whoever sets them chooses what nginx's root master reads.
NGINX_DIRECTIVE_PROPERTIES = frozenset({"omero.web.nginx_server_extra_config"})


def web_settings(properties: Mapping[str, str], info: VenvInfo, omerodir: Path | str,
                 where: Where = _nowhere) -> WebSettings:
    """Read the settings from the OMERO properties, with OMERO.web's defaults and parsers."""

    def prop(name: str, fallback: str | None) -> str | None:
        return effective(properties, info, name, fallback)

    def bad(name: str, message: str) -> NginxValueError:
        return NginxValueError(f"{_place(where, name)}{name} {message}")

    root = str(omerodir)
    port_text = prop("omero.web.application_server.port", "4080") or ""
    try:
        port = int(port_text)
    except ValueError:
        raise bad("omero.web.application_server.port", f"must be an integer, not {port_text!r}") from None
    # omero.web.prefix, else its deprecated name (omeroweb.settings' DEPRECATED_SETTINGS_MAPPINGS).
    prefix = properties.get("omero.web.prefix", properties.get("omero.web.force_script_name"))
    static_url, static_root = static_location(properties, info, root)
    extra_text = prop("omero.web.nginx_server_extra_config", "[]") or "[]"
    try:
        extra = json.loads(extra_text)
    except ValueError:
        raise bad("omero.web.nginx_server_extra_config", f"must be a JSON list of lines, not {extra_text!r}") from None
    if not isinstance(extra, list) or not all(isinstance(line, str) for line in extra):
        raise bad("omero.web.nginx_server_extra_config", "must be a list of strings, one nginx line each")
    return WebSettings(
        root=root,
        application_server=prop("omero.web.application_server", "wsgi-tcp") or "",
        host=prop("omero.web.application_server.host", "127.0.0.1") or "",
        port=port,
        prefix=prefix,
        prefix_property="omero.web.prefix" if "omero.web.prefix" in properties else "omero.web.force_script_name",
        static_url=static_url,
        static_root=static_root,
        extra_config=tuple(extra),
    )


def check_web_settings(web: WebSettings, where: Where = _nowhere) -> None:
    """Refuse what would break the nginx text, naming the property."""

    def check(name: str, value: str) -> None:
        problem = value_problem(value)
        if problem:
            raise NginxValueError(f"{_place(where, name)}{name} {value!r} {problem}")

    check("daemon.omerodir", web.root)  # every template has it (the maintenance root, development's paths)
    if web.prefix is not None:
        name = web.prefix_property
        check(name, web.prefix)
        if not web.prefix.rstrip("/").startswith("/"):
            raise NginxValueError(f"{_place(where, name)}{name} {web.prefix!r} must start with '/' and name a path"
                                  " such as '/omero'; leave it unset to serve OMERO.web at /")
    check("omero.web.static_url", web.static_url)
    if not web.static_url.rstrip("/"):
        raise NginxValueError(f"{_place(where, 'omero.web.static_url')}omero.web.static_url {web.static_url!r}"
                              " gives an empty nginx location: use a path such as '/static/'")
    check("omero.web.static_root", web.static_root)
    check("omero.web.application_server.host", web.host)
    for line in web.extra_config:
        if "\n" in line or "\r" in line:
            raise NginxValueError(f"{_place(where, 'omero.web.nginx_server_extra_config')}"
                                  "omero.web.nginx_server_extra_config: one line per list item, no line breaks")


def _place(where: Where, name: str) -> str:
    place = where(name)
    return place + ": " if place else ""


# -- render exactly as `omero web config` does -----------------------------------


def template_path(info: VenvInfo, kind: str) -> Path:
    return info.omeroweb_dir / "templates" / f"{KINDS[kind]}.conf.template"


def read_template(info: VenvInfo, kind: str) -> str:
    path = template_path(info, kind)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read omero-web's nginx template {path}: {e.strerror}"
                        f" (reinstall omero-web in {info.venv})") from None


def http_port(kind: str, http: int | None) -> int:
    """--http, else the template's default (a 0 means the default, as in `omero web config`)."""
    return http if http else DEFAULT_HTTP[kind]


def check_server_type(web: WebSettings, kind: str) -> None:
    """`omero web config` renders only for omero.web.application_server = wsgi-tcp."""
    if web.application_server != "wsgi-tcp":
        raise UserError(
            f"omero.web.application_server={web.application_server} cannot be used with nginx"
            f" ('omero web config {KINDS[kind]}' refuses it too): use wsgi-tcp (the default)",
            exit_code=EXIT_FAILURE,
        )


def check_port_conflict(web: WebSettings, port: int) -> None:
    if web.port == port:
        raise PortConflict(f"Port conflict: HTTP({port}) and wsgi({web.port}). Pick another port with --http")


def template_values(web: WebSettings, *, listen: str, servername: str, max_body_size: str,
                    omeroweb_dir: Path) -> dict[str, Any]:
    """The names the templates use, with the values `omero web config` gives them."""
    values: dict[str, Any] = {
        "ROOT": web.root,
        "OMEROWEBROOT": str(omeroweb_dir),
        "STATIC_ROOT": web.static_root,
        "STATIC_URL": web.static_url.rstrip("/"),
        "NOW": str(datetime.datetime.now()),
        "NGINX_SERVER_EXTRA_CONFIG": "",
        "HTTPPORT": listen,
        "MAX_BODY_SIZE": max_body_size,
        "SERVERNAME": servername,
        "FASTCGI_EXTERNAL": web.backend,
    }
    if web.extra_config:
        values["NGINX_SERVER_EXTRA_CONFIG"] = "\n".join(
            ["# <<<<< omero.web.nginx_server_extra_config", *web.extra_config,
             "# omero.web.nginx_server_extra_config >>>>>"]
        )
    # FORCE_SCRIPT_NAME starts with / and has no trailing / (except for no prefix: /).
    if web.prefix is not None:
        values["FORCE_SCRIPT_NAME"] = web.prefix.rstrip("/")
        values["PREFIX_NAME"] = "_" + re.sub(r"\W+", "", values["FORCE_SCRIPT_NAME"])
    else:
        values["FORCE_SCRIPT_NAME"] = "/"
        values["PREFIX_NAME"] = ""
    return values


def fill(template: str, values: Mapping[str, Any], name: str) -> str:
    """The template with Python %-substitution, as `omero web config` does, plus its newline.

    The port is ``%(HTTPPORT)d`` in the templates; here it is a string so that
    ``listen`` can say "443 ssl". For a number the bytes are the same.
    """
    try:
        return (template.replace("%(HTTPPORT)d", "%(HTTPPORT)s") % values) + "\n"
    except KeyError as e:
        raise UserError(f"omero-web's {name} uses %({e.args[0]})s, which this omerowebd does not know:"
                        " upgrade omerowebd") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"omero-web's {name} cannot be filled in: {e}") from None


def render(kind: str, web: WebSettings, info: VenvInfo, *, http: int | None = None,
           servername: str = "$hostname", max_body_size: str = "0") -> str:
    """Exactly what `omero web config KIND` prints for these settings."""
    check_server_type(web, kind)
    port = http_port(kind, http)
    check_port_conflict(web, port)
    return fill(read_template(info, kind),
                template_values(web, listen=str(port), servername=servername, max_body_size=max_body_size,
                                omeroweb_dir=info.omeroweb_dir),
                template_path(info, kind).name)


# -- what the daemon writes: the same text plus its additions ----------------------


@dataclass(frozen=True)
class Rendered:
    """The files of one apply: path -> bytes, in the order they are written."""

    files: dict[Path, bytes]
    server: Path
    location: Path
    maintenance: Path
    warnings: tuple[str, ...] = ()


def output_dir(config: Config) -> Path:
    return config.nginx.output_dir or config.daemon.state_dir / "nginx"


def maintenance_dir(config: Config) -> Path:
    return config.daemon.state_dir / "maintenance"


def render_outputs(config: Config, properties: Mapping[str, str], info: VenvInfo,
                   backends: Sequence[str], *, directory: Path | None = None,
                   page_dir: Path | None = None) -> Rendered:
    """The server file, the location include and the maintenance page, as the daemon writes them.

    ``directory`` and ``page_dir`` put the files elsewhere (the maintenance
    location's ``root`` follows ``page_dir``): the root-run publisher renders
    the same text into directories only root can write.
    """
    nginx = config.nginx
    web = web_settings(properties, info, config.daemon.omerodir, config.where)
    check_web_settings(web, config.where)
    check_server_type(web, "server")
    backends = [*backends, *(u for u in nginx.upstreams if u not in backends)]
    for address in backends:
        problem = value_problem(address)
        if problem:
            raise NginxValueError(f"{config.path}: backend address {address!r} {problem}")
    check_listen_conflict(nginx.listen, backends, config)
    page_dir = page_dir or maintenance_dir(config)
    problem = value_problem(str(page_dir))
    if problem:
        raise NginxValueError(f"{config.path}: daemon.state_dir {str(config.daemon.state_dir)!r} {problem}")

    warnings: list[str] = []
    values = template_values(web, listen=nginx.listen, servername=nginx.server_name,
                             max_body_size=nginx.max_body_size, omeroweb_dir=info.omeroweb_dir)
    values["FASTCGI_EXTERNAL"] = backends[0]
    texts = {}
    page_name = MAINTENANCE_PAGE
    for kind in ("server", "location"):
        name = template_path(info, kind).name
        text = fill(read_template(info, kind), values, name)
        text, found = _point_maintenance_at(text, page_dir)
        page_name = found or page_name
        if found:
            text = _route_proxy_errors_to_maintenance(text)
        else:
            warnings.append(f"omero-web's {name} has no maintenance location; no maintenance page for it")
        text, limited = _follow_only_owners_links(text, values["STATIC_ROOT"])
        if not limited:
            warnings.append(f"omero-web's {name} has no 'alias {values['STATIC_ROOT']};' to limit the links"
                            " nginx follows below STATIC_ROOT")
        if kind == "server":
            text = _add_upstream_servers(text, backends, name, nginx)
            text = _retry_on_next_upstream(text, backends, nginx)
            text = _insert_before_last_brace(text, _redirect_block(nginx.redirects, "    "), name)
        else:
            if len(backends) > 1:
                warnings.append(f"{nginx.location_file} proxies to {backends[0]} only: nginx.upstreams and"
                                " several daemon.bind addresses apply to the server file's upstream block")
            text += _redirect_block(nginx.redirects, "")
        texts[kind] = _header(name, config) + text

    directory = directory or output_dir(config)
    server = directory / nginx.server_file
    location = directory / nginx.location_file
    page = page_dir / page_name
    files = {
        page: maintenance_page(config, web).encode(),
        location: texts["location"].encode(),
        server: texts["server"].encode(),
    }
    return Rendered(files=files, server=server, location=location, maintenance=page, warnings=tuple(warnings))


def config_problems(config: Config, info: VenvInfo, backends: Sequence[str] | None = None) -> list[str]:
    """What ``omerowebctl check`` reports about the nginx files: what apply() would refuse.

    ``backends``: desired.backends_of(config) (what the config binds, when None).
    """
    if not config.nginx.enabled:
        return []
    try:
        render_outputs(config, config.properties, info, config.bind_addresses() if backends is None else backends)
    except UserError as e:
        return [str(e)]
    return []


def check_listen_conflict(listen: str, backends: Sequence[str], config: Config) -> None:
    """nginx must not listen on an address gunicorn holds (the daemon's version of the port check)."""
    address = listen_address(listen)
    if address is None:
        return
    host, port = address[0] or "", address[1]  # no host: every address
    for backend in backends:
        b_host, _, b_port = backend.rpartition(":")
        if backend.startswith("unix:") or b_port != port:
            continue
        wildcard = ("", "*", "0.0.0.0", "[::]")
        if host in wildcard or b_host in wildcard or host == b_host:
            raise PortConflict(f"{config.path}: nginx.listen {listen!r} is where gunicorn listens ({backend}):"
                               " pick another port for nginx")


def _header(template_name: str, config: Config) -> str:
    source = os.path.abspath(config.path)
    return (f"# Written by omerowebd from omero-web's {template_name}; edit {source}, not this file.\n"
            "# The daemon's additions are marked \"omerowebd:\".\n")


_MAINTENANCE_BLOCK = re.compile(r"(location\s+@maintenance\S*\s*\{)([^}]*)(\})")


def _point_maintenance_at(text: str, directory: Path) -> tuple[str, str | None]:
    """Point the maintenance location's root at the daemon's page; return (text, page name)."""
    match = _MAINTENANCE_BLOCK.search(text)
    if not match:
        return text, None
    body = match.group(2)
    def point(m: re.Match[str]) -> str:
        return f"{m.group(1)}# omerowebd: the page the daemon writes\n{m.group(1)}root {directory};"

    body, count = re.subn(r"(?m)^([ \t]*)root\s+[^;]*;", point, body, count=1)
    tries = re.search(r"try_files\s+([^;]*);", body)
    names = [w for w in (tries.group(1).split() if tries else ()) if w.startswith("/")]
    if not count or not names:
        return text, None
    name = names[-1].lstrip("/")
    if value_problem(name) or "/" in name:
        return text, None
    return text[: match.start(2)] + body + text[match.end(2):], name


def _follow_only_owners_links(text: str, static_root: str) -> tuple[str, bool]:
    """Let nginx follow a link below STATIC_ROOT only to what the link's owner owns; (text, done).

    nginx's workers serve STATIC_ROOT, which the service user writes (the
    daemon collects into it and keeps its release links there). A link that
    user plants would make the workers serve any file they can read.
    ``disable_symlinks if_not_owner`` checks every component of the path: a
    link is followed only when it and its target have the same owner, as the
    daemon's own release links (the service user's, to its own directories)
    do. A template or an admin's extra config that already says
    ``disable_symlinks`` keeps its own choice.
    """
    alias = re.compile(r"(?m)^([ \t]*)alias\s+" + re.escape(static_root) + r"\s*;")
    match = alias.search(text)
    if not match:
        return text, False
    if re.search(r"(?m)^[ \t]*disable_symlinks\s", text):
        return text, True
    indent = match.group(1)
    addition = (f"{indent}# omerowebd: follow a link below STATIC_ROOT only to a file of the link's owner\n"
                f"{indent}disable_symlinks if_not_owner;\n")
    return text[: match.start()] + addition + text[match.start():], True


_PROXY_LOCATION = re.compile(r"(?m)^([ \t]*)location\s+@proxy_to_app\S*\s*\{[ \t]*\n")


def _route_proxy_errors_to_maintenance(text: str) -> str:
    """Send the proxy's 502 to the maintenance page.

    The templates set ``error_page 502 @maintenance`` in the prefix location,
    but its ``try_files`` hands the request to the named ``@proxy_to_app``
    location, which inherits error pages only from the server level: the
    upstream's 502 never reaches the maintenance page, and nginx shows its bare
    502 even when the page exists. The same directive inside ``@proxy_to_app``
    makes it work, without touching the admin's other locations.
    """
    name = re.search(r"location\s+(@maintenance\S*)\s*\{", text)
    proxy = _PROXY_LOCATION.search(text)
    if not name or not proxy:
        return text
    body_end = text.find("}", proxy.end())
    if re.search(r"\berror_page\s", text[proxy.end():body_end]):
        return text  # omero-web fixed it in its template
    indent = proxy.group(1) + "    "
    addition = (f"{indent}# omerowebd: the upstream's 502 goes to the maintenance page from here too\n"
                f"{indent}error_page 502 {name.group(1)};\n")
    return text[: proxy.end()] + addition + text[proxy.end():]


def _add_upstream_servers(text: str, backends: Sequence[str], template_name: str, nginx: NginxSettings) -> str:
    """One upstream block over every backend, each taken out for a while after it fails.

    omero-web's line (``fail_timeout=0``) never takes its one backend out:
    with nothing to fall back on, that is right. With several, a dead host
    must be left out (nginx.max_fails, nginx.fail_timeout) instead of costing
    every request a failed attempt; nginx puts every backend back when all
    are out, so a site that comes back is found at once.
    """
    if len(backends) < 2:
        return text
    line = re.compile(r"(?m)^([ \t]*)server\s+" + re.escape(backends[0]) + r"(\s[^;\n]*)?;[ \t]*$")
    match = line.search(text)
    if not match:
        raise UserError(f"omero-web's {template_name} has no upstream server line to add more backends to:"
                        " remove nginx.upstreams or extra daemon.bind addresses")
    indent = match.group(1)
    kept = [w for w in (match.group(2) or "").split() if not w.startswith(("max_fails=", "fail_timeout="))]
    params = " ".join([*kept, f"max_fails={nginx.max_fails}", f"fail_timeout={nginx.fail_timeout}"])
    lines = [f"{indent}# omerowebd: nginx.upstreams and further daemon.bind addresses; each is left out for"
             " nginx.fail_timeout after nginx.max_fails failures"]
    lines += [f"{indent}server {address} {params};" for address in backends]
    return text[: match.start()] + "\n".join(lines) + text[match.end():]


def _retry_on_next_upstream(text: str, backends: Sequence[str], nginx: NginxSettings) -> str:
    """Send a request that meets a dead or failing backend to the next one.

    nginx's own default (``error timeout``) already retries a failed connect;
    502 and 503 add a gunicorn that answers but cannot serve. nginx never
    retries a non-idempotent request (POST, PATCH, LOCK) once it has reached
    a backend (no ``non_idempotent``: a form must not be submitted twice).
    The connect timeout bounds the wait for a host that is down (nginx's
    default is 60s).
    """
    if len(backends) < 2:
        return text
    proxy = _PROXY_LOCATION.search(text)
    if not proxy:
        return text
    body_end = text.find("}", proxy.end())
    if re.search(r"\bproxy_next_upstream\s", text[proxy.end():body_end]):
        return text  # the template chose already
    indent = proxy.group(1) + "    "
    addition = (f"{indent}# omerowebd: nginx.upstreams: a request that meets a dead backend goes to the next;"
                " never a POST that reached one\n"
                f"{indent}proxy_next_upstream error timeout http_502 http_503;\n"
                f"{indent}proxy_connect_timeout {nginx.connect_timeout};\n")
    return text[: proxy.end()] + addition + text[proxy.end():]


def _redirect_block(redirects: Mapping[str, str], indent: str) -> str:
    if not redirects:
        return ""
    lines = [f"{indent}# omerowebd: nginx.redirects (exact paths)"]
    lines += [f"{indent}location = {path} {{ return {REDIRECT_STATUS} {target}; }}"
              for path, target in sorted(redirects.items())]
    return "\n" + "\n".join(lines) + "\n"


def _insert_before_last_brace(text: str, addition: str, template_name: str) -> str:
    if not addition:
        return text
    end = text.rfind("\n}")
    if end < 0:
        raise UserError(f"omero-web's {template_name} has no server block to add nginx.redirects to")
    return text[:end] + addition + text[end:]


def maintenance_page(config: Config, web: WebSettings) -> str:
    """The page nginx shows while OMERO.web does not answer, from the (customizable) template.

    The template is HTML with ``$name`` placeholders (``string.Template``):
    ``$prefix`` (the site's path, "" for none) and ``$webclient_url``.
    Anything else with a ``$`` is left as it is.
    """
    path = config.nginx.maintenance_template or MAINTENANCE_TEMPLATE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UserError(f"{config.path}: nginx.maintenance_template {path}: cannot read it: {why}") from None
    prefix = (web.prefix or "").rstrip("/")
    return string.Template(text).safe_substitute(
        prefix=html.escape(prefix), webclient_url=html.escape(f"{prefix}/webclient/"),
    )


# -- write, validate, reload --------------------------------------------------------

Undo = Callable[[], Awaitable[None]]
Switch = Callable[[], Awaitable[Undo]]  # make staged files live; returns how to put the old ones back


@dataclass(frozen=True)
class CommandResult:
    ok: bool
    message: str
    at: float

    def describe(self) -> dict[str, Any]:
        return {"ok": self.ok, "message": self.message, "at": self.at}


async def run_command(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> CommandResult:
    """Run a command without blocking the loop; ok, and its most telling line."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=probe_env(), start_new_session=True,
        )
    except OSError as e:
        return CommandResult(False, f"cannot run {argv[0]}: {e.strerror}", time.time())
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return CommandResult(False, f"{argv[0]} did not finish within {timeout:.0f}s", time.time())
    except asyncio.CancelledError:
        proc.kill()
        raise
    lines = [line.strip() for line in out.decode(errors="replace").splitlines() if line.strip()]
    if proc.returncode == 0:
        return CommandResult(True, lines[-1] if lines else "ok", time.time())
    return CommandResult(False, first_error(lines) or f"{argv[0]} exited with status {proc.returncode}", time.time())


def first_error(lines: Sequence[str]) -> str | None:
    """nginx's first real complaint: an [emerg] line beats the [alert]/[warn] noise of a non-root nginx -t."""
    for level in ("[emerg]", "[crit]", "[error]"):
        for line in lines:
            if level in line:
                return re.sub(r"^nginx: ", "", line)
    return re.sub(r"^nginx: ", "", lines[0]) if lines else None


class NginxOutput:
    """The daemon's nginx files: written at start and on every reload that changes them."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.paths: dict[str, str] = {}
        self.enabled: bool | None = None
        self.written_at: float | None = None
        self.checked_at: float | None = None
        self.validation: CommandResult | None = None
        self.reload: CommandResult | None = None
        self.warnings: tuple[str, ...] = ()

    async def apply(self, config: Config, properties: Mapping[str, str], info: VenvInfo) -> Undo | None:
        """Stage and switch at once (a change that waits for nothing). Return how to put the old files back."""
        switch = await self._stage(config, properties, info, config.bind_addresses())
        return await switch() if switch else None

    async def stage(self, desired: Desired) -> Switch | None:
        """The supervisor's Output: the files for ``desired`` (desired.py derived its backends)."""
        return await self._stage(desired.config, desired.properties, desired.info, desired.backends)

    async def _stage(self, config: Config, properties: Mapping[str, str], info: VenvInfo,
                     backends: Sequence[str]) -> Switch | None:
        """Render and validate the files; nginx keeps what it has. Return the switch to them (None: no change).

        Files that depend on a new generation (a new prefix, static files)
        must not reach nginx before it serves, but a change nginx refuses
        must cost nothing: so everything is rendered and checked here, and
        the supervisor calls the switch once the new generation serves.
        """
        self.enabled = config.nginx.enabled
        if not config.nginx.enabled:
            return None
        rendered = render_outputs(config, properties, info, backends)
        self.paths = {"server": str(rendered.server), "location": str(rendered.location),
                      "maintenance": str(rendered.maintenance)}
        self.checked_at = time.time()
        for warning in rendered.warnings:
            if warning not in self.warnings:
                self.log.warning(warning)
        self.warnings = rendered.warnings
        changed = await asyncio.to_thread(_changed, rendered.files)
        if not changed:
            return None
        nginx = config.nginx
        if nginx.validate_command:
            # The check reads the files where nginx includes them; nginx itself
            # reads them only when reloaded. So: write them, check, and put the
            # old ones back: nginx goes on with the old until the switch.
            previous = await asyncio.to_thread(_write_changed, changed)
            try:
                self.validation = await run_command(nginx.validate_command)
            finally:
                await asyncio.to_thread(_restore, previous)
            if not self.validation.ok:
                self.log.error("nginx rejected the new config; previous files kept", message=self.validation.message)
                raise UserError(f"nginx rejected the new config: {self.validation.message}", exit_code=EXIT_FAILURE)

        async def switch() -> Undo:
            previous = await asyncio.to_thread(_write_changed, changed)
            self.written_at = time.time()
            self.log.info("nginx files written", files=[str(p) for p in previous])
            await self._reload_nginx(nginx)

            async def undo() -> None:
                await asyncio.to_thread(_restore, previous)
                self.written_at = time.time()
                self.log.info("nginx files restored", files=[str(p) for p in previous])
                await self._reload_nginx(nginx)

            return undo

        return switch

    async def _reload_nginx(self, nginx: NginxSettings) -> None:
        if not nginx.reload_command:
            return
        self.reload = await run_command(nginx.reload_command)
        if self.reload.ok:
            self.log.info("nginx reloaded", command=list(nginx.reload_command))
        else:
            # The files passed validation; a reload that fails (nginx not running,
            # no permission) is nginx's problem, not a reason to refuse the config.
            self.log.error("nginx reload command failed", command=list(nginx.reload_command),
                           message=self.reload.message)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "files": dict(self.paths),
            "checked_at": self.checked_at,
            "written_at": self.written_at,
            "validation": self.validation.describe() if self.validation else None,
            "reload": self.reload.describe() if self.reload else None,
            "warnings": list(self.warnings),
        }


APPLIED_MARKER = "applied.json"


def mark_applied(config: Config, log: Any) -> None:
    """Say which TOML now serves: the sha256 of its bytes, and when it was applied.

    The root-run omerowebd-nginx-publish renders nginx's files itself from the
    TOML it reads; it publishes only when this digest equals that of the TOML
    it read, i.e. once the daemon has applied it. It trusts nothing else here.
    The time makes every start and reload a change its path unit sees (a new
    venv or socket address changes the files under the same TOML).
    """
    if not config.nginx.enabled:
        return
    path = output_dir(config) / APPLIED_MARKER
    data = json.dumps({"digest": config.digest, "applied_at": time.time()}).encode() + b"\n"
    try:
        _make_dir(path.parent)
        write_atomic(path, data, mode=0o644)
    except OSError as e:
        log.warning("cannot write the applied marker for the nginx publisher", path=str(path), error=e.strerror)


def _changed(files: Mapping[Path, bytes]) -> dict[Path, bytes]:
    """The files whose content (or mode) differs from what is on disk."""
    out = {}
    for path, data in files.items():
        if not holds(path, data, 0o644):  # missing, unreadable, not a file: writing it says what is wrong
            out[path] = data
    return out


def _write_changed(files: Mapping[Path, bytes]) -> dict[Path, bytes | None]:
    """Write each file that differs; return the previous content of those (None: it did not exist)."""
    previous: dict[Path, bytes | None] = {}
    try:
        for path, data in files.items():
            found = read_regular(path)  # None: missing (or not a file: replaced, and removed on a restore)
            old = found[0] if found is not None else None
            if found == (data, 0o644):
                continue
            try:
                _make_dir(path.parent)
            except OSError as e:  # said of the file it was for
                raise OSError(e.errno, e.strerror, str(path)) from None
            previous[path] = old
            write_atomic(path, data, mode=0o644)
    except OSError as e:
        _restore(previous)
        hint = (" (the daemon's user must own nginx.output_dir and STATE_DIR/maintenance)"
                if e.errno in (errno.EACCES, errno.EPERM) else "; the previous files are kept")
        raise UserError(f"cannot write the nginx file {e.filename}: {e.strerror}{hint}") from None
    return previous


def _restore(previous: Mapping[Path, bytes | None]) -> None:
    for path, data in previous.items():
        if data is None:
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, data, mode=0o644)


def _make_dir(path: Path) -> None:
    """Create a directory nginx's workers can read (the unit's UMask would make it 0750)."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
