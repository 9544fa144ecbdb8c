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
import stat
from collections.abc import Iterator
from pathlib import Path

MAX_LINKS = 40


def _mode_problem(path: str, st: os.stat_result, what: str, sticky_ok: bool = True) -> str | None:
    if st.st_uid != 0:
        return f"{what} {path} is owned by uid {st.st_uid}, not root"
    if st.st_mode & stat.S_IWOTH and not (sticky_ok and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        return f"{what} {path} is writable by everyone"
    if st.st_mode & stat.S_IWGRP and st.st_gid != 0:
        return f"{what} {path} is writable by group {st.st_gid}"
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
                target = os.path.realpath(entry.path)
                yield from path_problems(target, what)
                if os.path.isdir(target):
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


def _pth_directories(site: Path) -> Iterator[Path]:
    """Directories that ``.pth`` files in ``site`` put on sys.path (``import`` lines are code in the file itself)."""
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
            if not line or line.startswith(("#", "import ", "import\t")):
                continue
            yield (site / line).resolve()


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
            for extra in _pth_directories(site):
                if extra.exists() and not str(extra).startswith(str(venv) + os.sep):
                    problems += path_problems(extra, "path from a .pth file") or tree_problems(extra, "file")
    return problems[:5]


def venv_refusal(venv: str | os.PathLike[str], doing: str) -> str | None:
    """One line saying why root must not run ``venv``'s Python for ``doing``, or None when it may (or we are not root)."""
    if os.geteuid() != 0:
        return None
    problems = venv_problems(venv)
    if not problems:
        return None
    return (
        f"refusing to {doing} as root: {problems[0]}; anyone who can write there could run code as root."
        f" Make the venv root's (chown -R root:root {venv} && chmod -R go-w {venv}),"
        " or run this as the service user (e.g. runuser -u omero-web -- omerowebctl ...)"
    )
