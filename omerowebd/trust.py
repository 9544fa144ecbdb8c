"""May a root process read, import or run these files? Only if root owns them.

The service user (omero-web) must be assumed compromised. Before a root
process runs the OMERO.web venv's Python (``omerowebctl check`` as root, the
nginx publisher) or reads a file to act on it, everything that decides what
runs must be out of that user's reach: the file itself, every directory on
the way to it (a writable parent lets its owner swap the entry), and, for a
venv, every file Python may import from it, the interpreter and its standard
library, and the directories that ``.pth`` files add to ``sys.path``.

"Out of reach" means: owned by root, not writable by others, and writable by
the group only when that group is root's. A world-writable directory with the
sticky bit (``/tmp``) is passed through: nobody but root can rename or remove
root's entries in it.

Leaf module: no imports from the package, so the root-side entry points can
use it before trusting anything else.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

MAX_LINKS = 40
_HARMLESS_DEVICES = {os.makedev(1, 3), os.makedev(1, 5)}  # /dev/null, /dev/zero


def _mode_problem(path: str, st: os.stat_result, what: str, sticky_ok: bool = True) -> str | None:
    if stat.S_ISCHR(st.st_mode) and st.st_rdev in _HARMLESS_DEVICES:
        return None  # systemd's masks and the like: /dev/null holds no code
    if st.st_uid != 0:
        return f"{what} {path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH and not (sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{what} {path} is writable by everyone"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"{what} {path} is writable by group {st.st_gid}"
    if not stat.S_ISLNK(st.st_mode):
        who = _acl_writers(path, stat.S_ISDIR(st.st_mode))
        if who:
            return f"{what} {path} is writable by {who} through an ACL (setfacl -b to remove it)"
    return None


# POSIX ACLs as the kernel stores them (system.posix_acl_access/_default):
# a 4-byte version, then 8-byte entries (tag u16, perm u16, id u32). With an
# ACL, the mode's group bits are the mask, so a `setfacl -m u:omero-web:rw`
# hides behind an innocent-looking `root:root 0664`.
_ACL_USER, _ACL_GROUP, _ACL_WRITE = 0x02, 0x08, 0x02
_ACL_NAMES = ("system.posix_acl_access", "system.posix_acl_default")


def _acl_writers(path: str, is_dir: bool) -> str | None:
    """Who other than root a named ACL entry lets write ``path`` (or, for a directory, what is created in it)."""
    for name in _ACL_NAMES if is_dir else _ACL_NAMES[:1]:
        try:
            data = os.getxattr(path, name, follow_symlinks=False)
        except OSError:  # no ACL (ENODATA), or a file system without them
            continue
        for offset in range(4, len(data) - 7, 8):
            tag, perm, ident = struct.unpack_from("<HHI", data, offset)
            if tag in (_ACL_USER, _ACL_GROUP) and perm & _ACL_WRITE and ident != 0:
                return f"{'uid' if tag == _ACL_USER else 'gid'} {ident}"
    return None


def path_problems(path: str | os.PathLike[str], what: str = "path") -> list[str]:
    """Problems with ``path`` and every directory leading to it (symbolic links followed, each checked)."""
    return _walk_path(os.path.abspath(os.fspath(path)), what, MAX_LINKS)


def _walk_path(path: str, what: str, links_left: int) -> list[str]:
    parts = [p for p in path.split("/") if p]
    current = "/"
    for index, part in enumerate(parts):
        try:
            st = os.lstat(current)
        except OSError as e:
            return [f"{what} {current}: {e.strerror}"]
        problem = _mode_problem(current, st, "directory" if current != path else what)
        if problem:
            return [problem]
        nxt = os.path.join(current, part)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return [f"{what} {path} does not exist"]
        except OSError as e:
            return [f"{what} {nxt}: {e.strerror}"]
        if stat.S_ISLNK(st.st_mode):
            # The link sits in a directory only root can write: it cannot be
            # swapped. Where it points must be just as safe.
            if links_left == 0:
                return [f"{what} {path}: too many symbolic links"]
            target = os.path.normpath(os.path.join(current, os.readlink(nxt)))
            rest = "/".join(parts[index + 1 :])
            return _walk_path(os.path.join(target, rest) if rest else target, what, links_left - 1)
        current = nxt
    try:
        st = os.lstat(current)
    except OSError as e:
        return [f"{what} {current}: {e.strerror}"]
    problem = _mode_problem(current, st, what)
    return [problem] if problem else []


def tree_problems(root: str | os.PathLike[str], what: str = "file", limit: int = 5) -> list[str]:
    """Problems with anything below ``root`` (not the path leading to it); links are followed and checked."""
    problems: list[str] = []
    seen: set[tuple[int, int]] = set()
    for problem in _tree(os.fspath(root), what, seen):
        problems.append(problem)
        if len(problems) >= limit:
            break
    return problems


def _tree(top: str, what: str, seen: set[tuple[int, int]]) -> Iterator[str]:
    try:
        st = os.stat(top)
    except OSError as e:
        yield f"{what} {top}: {e.strerror}"
        return
    if (st.st_dev, st.st_ino) in seen:
        return
    seen.add((st.st_dev, st.st_ino))
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            yield f"{what} {directory}: {e.strerror}"
            continue
        for entry in entries:
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError as e:
                yield f"{what} {entry.path}: {e.strerror}"
                continue
            if stat.S_ISLNK(est.st_mode):
                # Walk the link as Python will: every link on the way is
                # checked, not just where it leads today.
                problems = path_problems(entry.path, what)
                yield from problems
                target = os.path.realpath(entry.path)
                if not problems and os.path.isdir(target):
                    yield from _tree(target, what, seen)
                continue
            # No sticky exception inside a tree: anyone could add a module there.
            problem = _mode_problem(entry.path, est, what, sticky_ok=False)
            if problem:
                yield problem
            elif stat.S_ISDIR(est.st_mode):
                key = (est.st_dev, est.st_ino)
                if key not in seen:
                    seen.add(key)
                    stack.append(entry.path)


def file_problems(path: str | os.PathLike[str], what: str = "file") -> list[str]:
    """A file root may act on: root's, and so is every directory leading to it."""
    return path_problems(path, what)


def root_may_keep_in(directory: str | os.PathLike[str]) -> bool:
    """May this process keep a remembered answer in ``directory``? Anyone in
    their own; root only where root alone controls every step of the path."""
    return os.geteuid() != 0 or not path_problems(directory, "directory")


def read_own_file(path: str | os.PathLike[str], max_bytes: int) -> tuple[bytes | None, str | None]:
    """A file the daemon remembered something in, read only if it may trust it:
    (its bytes, None), (None, None) if there is none, or (None, why not).

    Trusted: a regular file, not a link, owned by the user this process runs
    as, which nobody else may write, at most ``max_bytes``. Root first checks
    that root alone controls the whole path (file_problems)."""
    if os.geteuid() == 0:
        # Before opening: with every directory on the way root's alone, nobody can swap the file after.
        if not os.path.lexists(path):
            return None, None
        problems = file_problems(path, "file")
        if problems:
            return None, f"{problems[0]} (root trusts only what root alone controls)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, "it is a symbolic link" if os.path.islink(path) else f"cannot open it: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "it is not a regular file"
        if st.st_uid != os.geteuid():
            return None, f"it is owned by uid {st.st_uid}, not by uid {os.geteuid()} that runs omerowebd"
        if st.st_mode & 0o022:
            return None, f"others may write it (mode {stat.S_IMODE(st.st_mode):04o})"
        if st.st_size > max_bytes:
            return None, f"it is larger than {max_bytes >> 10} KiB"
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1), None
    finally:
        os.close(fd)


def _base_prefix(venv: Path) -> Path | None:
    """The interpreter's prefix, from pyvenv.cfg's ``home`` (the directory of the base python)."""
    try:
        lines = (venv / "pyvenv.cfg").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return Path(value.strip()).parent
    return None


def _pth_entries(site: Path) -> Iterator[Path]:
    """Paths that ``.pth`` files in ``site`` put on sys.path, as written (not resolved).

    ``import`` lines are code in a file the tree walk has checked; what they
    load lives in site-packages too, except the finders of editable installs
    (``__editable__.*.pth``), whose MAPPING names source trees elsewhere.
    """
    try:
        names = sorted(n for n in os.listdir(site) if n.endswith(".pth"))
    except OSError:
        return
    for name in names:
        try:
            text = (site / name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("import ", "import\t")):
                yield from _editable_paths(site, line)
                continue
            yield Path(os.path.normpath(site / line))


def _editable_paths(site: Path, line: str) -> Iterator[Path]:
    """Source directories an editable install's finder maps its packages to (setuptools >= 64)."""
    import ast  # here: the early start imports this module before gunicorn's spawn, and needs none of it

    for module in _finder_modules(line):
        try:
            tree = ast.parse((site / f"{module}.py").read_text(errors="replace"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("MAPPING", "NAMESPACES")
                                                    for t in node.targets):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                for paths in value.values() if isinstance(value, dict) else ():
                    for path in [paths] if isinstance(paths, str) else paths if isinstance(paths, list) else ():
                        if isinstance(path, str):
                            yield Path(os.path.normpath(path))


def _finder_modules(line: str) -> list[str]:
    return [word for word in line.replace(";", " ").split() if word.startswith("__editable___") and word.isidentifier()]


def _creatable_problems(path: Path, what: str) -> list[str]:
    """For a path that does not exist (yet): can anyone but root create it? Checked at its nearest existing ancestor."""
    ancestor = path
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    problems = path_problems(ancestor, what)
    if problems:
        return problems
    try:
        st = os.stat(ancestor)
    except OSError as e:
        return [f"{what} {ancestor}: {e.strerror}"]
    # Where a missing entry would be created, a sticky bit protects nothing.
    problem = _mode_problem(str(ancestor), st, what, sticky_ok=False)
    return [f"{problem} (and {path} may be created there)"] if problem else []


def search_path_problems(entries: Iterable[str | os.PathLike[str]], what: str) -> list[str]:
    """Problems with directories Python (or the loader) searches: each, as it is or could come to be."""
    problems: list[str] = []
    for entry in entries:
        path = Path(os.path.abspath(os.fspath(entry)))
        if os.path.lexists(path):
            problems += path_problems(path, what) or (tree_problems(path, what) if path.is_dir() else [])
        else:
            problems += _creatable_problems(path, what)
    return problems


def venv_problems(venv: str | os.PathLike[str]) -> list[str]:
    """Problems that make running ``venv``'s Python as root unsafe; empty when root alone controls it."""
    venv = Path(os.path.abspath(os.fspath(venv)))
    problems = path_problems(venv, "venv")
    if problems:
        return problems
    problems = tree_problems(venv, "venv file")
    if problems:
        return problems
    python = venv / "bin" / "python"
    problems = path_problems(python, "interpreter")
    base = _base_prefix(venv)
    if not problems and base is not None:
        for lib in sorted(base.glob("lib/python3*")):
            problems += path_problems(lib, "standard library") or tree_problems(lib, "standard library file")
    if not problems:
        for site in sorted(venv.glob("lib/python3*/site-packages")):
            outside = [p for p in _pth_entries(site) if not str(p).startswith(str(venv) + os.sep)]
            problems += search_path_problems(outside, "path from a .pth file")
    return problems[:5]


# Variables that make Python or the dynamic loader take code from elsewhere.
# Root's environment is root's, but an admin may have exported, say,
# PYTHONPATH=$OMERODIR/lib/python as older OMERO guides said: a directory the
# service user writes.
_SEARCH_PATH_VARIABLES = ("PYTHONPATH", "PYTHONHOME", "LD_LIBRARY_PATH", "LD_PRELOAD", "LD_AUDIT")


def environment_problems(env: Mapping[str, str]) -> list[str]:
    """Problems with what the environment adds to what Python and the loader load."""
    problems: list[str] = []
    for name in _SEARCH_PATH_VARIABLES:
        value = env.get(name)
        if not value:
            continue
        separators = " :" if name in ("LD_PRELOAD", "LD_AUDIT") else ":"
        entries = [e for e in re.split(f"[{separators}]", value)]
        # An empty PYTHONPATH entry means the working directory (the probe's is /).
        entries = [e or "/" for e in entries]
        problems += search_path_problems(entries, f"${name} entry")
    return problems


def venv_refusal(venv: str | os.PathLike[str], doing: str, env: Mapping[str, str] | None = None) -> str | None:
    """One line saying why root must not run ``venv``'s Python for ``doing``, or None when it may (or we are not root).

    ``env`` is the environment the venv's Python will get: what it adds to
    the search paths must be root's too."""
    if os.geteuid() != 0:
        return None
    problems = (environment_problems(env) if env else []) or venv_problems(venv)
    if not problems:
        return None
    return (
        f"refusing to {doing} as root: {problems[0]}; anyone who can write there could run code as root."
        f" Make the venv root's (chown -R root:root {venv} && chmod -R go-w {venv}),"
        " or run this as the service user (e.g. runuser -u omero-web -- omerowebctl ...)"
    )
