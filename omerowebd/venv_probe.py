"""Asks the OMERO.web virtualenv what it knows. Run as ``VENV/bin/python venv_probe.py``.

A standalone script: it runs on the venv's Python (3.10 for zeroc-ice), so it
imports nothing of omerowebd and keeps to syntax that Python understands.

stdin:  {"properties": {name: text}, "omerodir": path}  -- the candidate OMERO properties
stdout: {"versions": {...}, "omeroweb_dir": ..., "catalogue": {name: {...}},
         "errors": {name: message}, "fatal": message-or-null}

The catalogue is ``omeroweb.settings``' own mapping tables (and those of the
apps in ``omero.web.apps``): the authority on which properties exist, their
defaults and their parsers. Each candidate value is run through the parser
OMERO.web itself will use, so what passes here is what OMERO.web accepts.
"""

import contextlib
import errno
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time

DISTRIBUTIONS = ("omero-web", "omero-py", "Django", "gunicorn", "zeroc-ice", "gevent", "whitenoise")
BOOLEAN_TEXT = ("true", "false", "1", "0", "t", "f")


def kind_of(parser, default):
    name = getattr(parser, "__name__", "")
    if name == "parse_boolean":
        return "bool"
    if name in ("int", "leave_none_unset_int"):
        return "int"
    if name in ("loads", "parse_paths"):
        try:
            value = json.loads(default) if isinstance(default, str) else default
        except ValueError:
            return "json"
        if isinstance(value, dict):
            return "object"
        if isinstance(value, (list, tuple)):
            return "list"
        return "json"
    return "str"


def versions():
    out = {"python": "%d.%d.%d" % sys.version_info[:3]}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def check(name, parser, kind, value, leave_unset):
    if kind == "bool" and value.strip().lower() not in BOOLEAN_TEXT:
        return "must be true or false, not %r" % value
    try:
        parser(value)
    except leave_unset:
        pass
    except Exception as e:  # the parser's own words are the best explanation
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if kind in ("int",):
            return "must be an integer, not %r" % value
        if kind in ("list", "object", "json"):
            return "must be JSON (%s), not %r: %s" % (kind, value, message)
        return message
    if kind == "list" or kind == "object":
        parsed = json.loads(value)
        want = list if kind == "list" else dict
        if not isinstance(parsed, want):
            return "must be a JSON %s, not %r" % (kind, value)
    return None


def load_settings():
    """Import omeroweb.settings (the slow part: Ice, Django); (module, LeaveUnset) or an error."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "omeroweb.settings")
    try:
        settings = importlib.import_module("omeroweb.settings")
        from omeroweb.utils import LeaveUnset
    except Exception as e:
        return None, None, "cannot import omeroweb.settings: %s: %s" % (type(e).__name__, e)
    return settings, LeaveUnset, None


def answer(settings, leave_unset, omerodir, request):
    properties = request.get("properties", {})
    site_omerodir = request.get("omerodir")
    result = {"versions": VERSIONS, "catalogue": {}, "errors": {}, "fatal": None,
              "omeroweb_dir": os.path.dirname(settings.__file__)}
    tables = []
    for table in ("INTERNAL_SETTINGS_MAPPING", "CUSTOM_SETTINGS_MAPPINGS", "DEVELOPMENT_SETTINGS_MAPPINGS"):
        tables.append(getattr(settings, table, {}))
    apps = []
    try:
        apps = json.loads(properties.get("omero.web.apps", "[]"))
    except ValueError:
        pass
    importlib.invalidate_caches()
    for app in apps if isinstance(apps, list) else []:
        if not isinstance(app, str):
            continue
        spec = None
        for candidate in ("omeroweb." + app, app):
            with contextlib.suppress(Exception):
                spec = spec or importlib.util.find_spec(candidate)
        if spec is None:
            result["errors"]["omero.web.apps"] = (
                "app %r cannot be imported from the OMERO.web venv (pip install it there)" % app
            )
            continue
        with contextlib.suppress(Exception):
            module = importlib.import_module(app + ".settings")
            tables.append(getattr(module, "CUSTOM_SETTINGS_MAPPINGS", {}))

    deprecated = set(getattr(settings, "DEPRECATED_SETTINGS_MAPPINGS", {}))
    for table in tables:
        for name, values in table.items():
            django_name, default, parser, description = values[:4]
            kind = kind_of(parser, default)
            if isinstance(default, str) and site_omerodir:
                # Defaults derived from OMERODIR (static_root, logdir) name the site's, not ours.
                default = default.replace(omerodir, site_omerodir)
            result["catalogue"][name] = {
                "setting": django_name,
                "default": default if isinstance(default, (str, int, float, bool, type(None))) else str(default),
                "kind": kind,
                "parser": getattr(parser, "__name__", str(parser)),
                "description": description or "",
                "deprecated": name in deprecated,
            }
            if name in properties and name not in result["errors"]:
                problem = check(name, parser, kind, properties[name], leave_unset)
                if problem:
                    result["errors"][name] = problem
    for name in deprecated:
        result["catalogue"].setdefault(name, {"kind": "str", "deprecated": True, "description": ""})
    return result


VERSIONS = versions()


GROUP_NICE = 10  # the least this probe's session group is lowered to: gunicorn's group starts at 0, like every new one


def lower_priority(nice):
    """Yield the CPU to the site's workers: nice ``nice``, and, as its own session's leader, that session's group
    (to ``nice``, and at least GROUP_NICE: a new session's group starts at 0 whatever the daemon's nice value).

    The kept probe runs while the first generation's workers serve their first
    requests (a start on a remembered answer asks the venv again once it
    serves) and beside a busy site on a reload; the site comes first. Where
    the kernel groups processes by session (autogroups, on by default: where
    no cgroup CPU controller ranks the daemon and its gunicorns) a nice
    value ranks a process only inside its own session's group, and each group
    competes as an equal: a niced probe in the daemon's session took as much
    CPU as a worker (measured by hand: two busy processes lost 40 % of their
    work to it, 4 % with its group lowered). The probe lowers itself, never the daemon by
    pid: only the process itself knows that its pid is still its own. Only as
    its session's leader (the daemon starts it so): the group is the whole
    session's. Raising either needs no privilege; what the kernel refuses is
    left as it is (no autogroups, a /proc that hides it). The group's loop is
    session_sweep.lower_priority's: both run by path on the venv's Python, so
    neither can import the other.
    """
    try:
        if nice > os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass
    if os.getsid(0) != os.getpid():
        return
    for _ in range(3):
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(max(nice, GROUP_NICE)))
            return
        except OSError as e:
            if e.errno != errno.EAGAIN:
                return
            time.sleep(0.11)  # the kernel takes one such change per 0.1 s, machine-wide


def main():
    """One request on stdin, one answer; or, with --serve, one per line until stdin closes.

    The daemon keeps a --serve process warm, so a reload does not pay for
    importing Ice and Django again: the answer takes milliseconds. With
    --nice N, it first lowers its priority to N (lower_priority).
    """
    args = sys.argv[1:]
    serve = "--serve" in args
    if "--nice" in args:
        lower_priority(int(args[args.index("--nice") + 1]))
    out = sys.stdout
    with tempfile.TemporaryDirectory() as omerodir, contextlib.redirect_stdout(sys.stderr):
        # An empty OMERODIR: import the settings module for its tables without
        # reading (or writing) the site's own files.
        os.environ["OMERODIR"] = omerodir
        settings, leave_unset, fatal = load_settings()
        for line in sys.stdin if serve else [sys.stdin.read()]:
            if not line.strip():
                continue
            request = json.loads(line)
            if fatal:
                result = {"versions": VERSIONS, "catalogue": {}, "errors": {}, "fatal": fatal}
            else:
                result = answer(settings, leave_unset, omerodir, request)
            result["id"] = request.get("id")  # the daemon matches answers to questions by it
            out.write(json.dumps(result) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
