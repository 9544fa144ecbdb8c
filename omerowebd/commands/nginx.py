"""omerowebctl nginx: the nginx config for this site, as `omero web config` prints it."""

from __future__ import annotations

import argparse
import sys

from .. import desired, nginx, venv
from ..errors import UserError
from ..exits import EXIT_OK, EXIT_USAGE
from . import load_config

EPILOG = """\
The text is omero-web's own template from the venv, filled in exactly as
`omero web config nginx|nginx-location|nginx-development` fills it, from the
[omero] properties of the config file (omero.web.prefix, static_url,
static_root, application_server.host/port, nginx_server_extra_config).

--written prints instead the file omerowebd itself writes from the [nginx]
table: the same text plus the maintenance page location, redirects and
upstreams.

exit codes: 0 printed; 1 port conflict or an unsupported
omero.web.application_server; 2 usage error; 78 the config must be fixed.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nginx", help="print the nginx config for this site (as `omero web config nginx` does)",
        description="Print the nginx config for the site in the config file.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("type", choices=list(nginx.KINDS),
                   help="server: a server block for inclusion (omero web config nginx); location: the location"
                   " blocks only (nginx-location); development: a standalone nginx.conf (nginx-development)")
    p.add_argument("--http", type=int, metavar="N", help="port nginx listens on (default 80; 8080 for development)")
    p.add_argument("--servername", default="$hostname", metavar="S", help="nginx server_name (default $hostname)")
    p.add_argument("--max-body-size", default="0", metavar="X",
                   help="nginx client_max_body_size (default 0: no limit)")
    p.add_argument("--written", action="store_true",
                   help="print the file omerowebd writes (server or location), from the [nginx] table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args)
    info = venv.probe_sync(config.daemon.venv, config.properties, config.daemon.omerodir)
    if args.written:
        return _print_written(args, config, info)
    web = nginx.web_settings(config.properties, info, config.daemon.omerodir, config.where)
    nginx.check_web_settings(web, config.where)
    if args.type != "location":
        for option, value, how in (("--servername", args.servername, {"words": True, "backslash": True}),
                                   ("--max-body-size", args.max_body_size, {})):
            problem = nginx.value_problem(value, **how)
            if problem:
                raise UserError(f"{option} {value!r} {problem}", exit_code=EXIT_USAGE)
    sys.stdout.write(nginx.render(args.type, web, info, http=args.http, servername=args.servername,
                                  max_body_size=args.max_body_size))
    return EXIT_OK


def _print_written(args: argparse.Namespace, config: nginx.Config, info: venv.VenvInfo) -> int:
    if args.type == "development":
        raise UserError("--written: omerowebd writes only the server and location files", exit_code=EXIT_USAGE)
    if args.http or args.servername != "$hostname" or args.max_body_size != "0":
        raise UserError("--written takes listen, server_name and max_body_size from the [nginx] table,"
                        " not from --http, --servername or --max-body-size", exit_code=EXIT_USAGE)
    wanted = desired.derive(config, info, venv.fingerprint(config.daemon.venv))  # what the daemon renders from
    rendered = nginx.render_outputs(config, wanted.properties, info, wanted.backends)
    for warning in rendered.warnings:
        print(f"omerowebctl: warning: {warning}", file=sys.stderr)
    path = rendered.server if args.type == "server" else rendered.location
    sys.stdout.write(rendered.files[path].decode())
    return EXIT_OK
