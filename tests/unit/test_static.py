"""static.py without a venv: release names, the cutover of the unversioned names, pruning."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from omerowebd import static
from omerowebd.venv import VenvInfo


def info(tmp_path: Path, version: str = "5.33.2") -> VenvInfo:
    return VenvInfo(venv=tmp_path / "venv", versions={"omero-web": version}, omeroweb_dir=tmp_path / "omeroweb",
                    catalogue={"omero.web.static_url": {"default": "/static/"}})


def collected(s: static.StaticFiles, number: int, release: static.Release, files: dict[str, str]) -> None:
    """What collect() leaves after collectstatic ran: the directory, and the record saying it is whole."""
    for name, text in files.items():
        path = release.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    record = s._record()
    record.setdefault("complete", {})[release.name] = release.key
    s._save(record)
    assert asyncio.run(s.collect(number, release, None, Path("/nonexistent"))) is False  # type: ignore[arg-type]


def test_a_release_is_named_for_its_version_and_what_it_collects(tmp_path):
    omerodir = tmp_path / "omerodir"
    a = static.release_for(info(tmp_path), {}, "packages-1", omerodir)
    assert static.RELEASE.fullmatch(a.name) and a.name.startswith("release-5.33.2-")
    assert a.static_root == omerodir / "var" / "static" and a.static_url == "/static/"
    assert a.properties() == {"omero.web.static_root": str(omerodir / "var" / "static" / a.name),
                              "omero.web.static_url": f"/static/{a.name}/"}
    assert static.release_for(info(tmp_path), {"omero.web.login_logo": "x"}, "packages-1", omerodir) == a
    assert static.release_for(info(tmp_path), {}, "packages-2", omerodir).name != a.name
    assert static.release_for(info(tmp_path), {"omero.web.apps": '["x"]'}, "packages-1", omerodir).name != a.name
    other = static.release_for(info(tmp_path), {"omero.web.static_url": "/omero/static",
                                                "omero.web.static_root": "/srv/static"}, "p", omerodir)
    assert other.url == f"/omero/static/{other.name}/" and other.directory == Path("/srv/static") / other.name
    odd = static.release_for(info(tmp_path, "5.0;{evil}/"), {}, "p", omerodir)
    assert static.RELEASE.fullmatch(odd.name) and "/" not in odd.name and ";" not in odd.name


def test_cutover_links_the_unversioned_names_and_clears_what_collectstatic_left(tmp_path):
    s = static.StaticFiles(tmp_path / "state")
    old = static.release_for(info(tmp_path, "5.27.0"), {}, "old", tmp_path / "omerodir")
    new = static.release_for(info(tmp_path), {}, "new", tmp_path / "omerodir")
    root = old.static_root
    # What a collectstatic before releases left: a stale copy at the top, and a name no release has.
    (root / "webgateway" / "css").mkdir(parents=True)
    (root / "webgateway" / "css" / "ome.body.css").write_text("stale")
    (root / "gone.txt").write_text("stale")
    (root / f"{static.LINK_TMP}webclient").mkdir()  # a cutover that died half-way
    collected(s, 1, old, {"webgateway/css/ome.body.css": "old", "webclient/x.js": "old"})
    s.cut_over(1)
    assert os.readlink(root / "webgateway") == f"{old.name}/webgateway"
    assert (root / "webgateway" / "css" / "ome.body.css").read_text() == "old"
    assert not (root / "gone.txt").exists()
    assert not os.path.lexists(root / f"{static.LINK_TMP}webclient")
    assert sorted(p.name for p in root.iterdir()) == sorted([old.name, "webclient", "webgateway"])

    collected(s, 2, new, {"webgateway/css/ome.body.css": "new", "figure/y.js": "new"})
    s.cut_over(2)
    assert (root / "webgateway" / "css" / "ome.body.css").read_text() == "new"
    assert (root / "figure" / "y.js").read_text() == "new"
    assert not (root / "webclient").exists()  # the new release has none
    assert (old.directory / "webclient" / "x.js").read_text() == "old"  # the old pages' own URLs still serve
    record = json.loads((tmp_path / "state" / static.RECORD).read_text())
    assert record["current"] == new.name and record["previous"] == old.name
    assert s.status()["release"] == new.name


def test_prune_keeps_live_generations_the_serving_and_the_previous_release(tmp_path):
    s = static.StaticFiles(tmp_path / "state")
    releases = [static.release_for(info(tmp_path), {}, f"p{i}", tmp_path / "omerodir") for i in range(4)]
    for number, release in enumerate(releases, 1):
        collected(s, number, release, {"webgateway/a.css": str(number)})
        s.cut_over(number)
    root = releases[0].static_root
    # Generations 1-3 are gone, 4 serves: 3 is the previous release; 1 and 2 go.
    removed = asyncio.run(s.prune([4]))
    assert sorted(removed) == sorted([releases[0].name, releases[1].name])
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("release-")) == sorted(
        [releases[2].name, releases[3].name])
    assert set(s._record()["complete"]) == {releases[2].name, releases[3].name}
    # A generation still running an old release keeps it, whatever the order of cutovers.
    s2 = static.StaticFiles(tmp_path / "state2")
    for number, release in enumerate(releases[2:], 1):
        collected(s2, number, release, {"webgateway/a.css": str(number)})
    s2.cut_over(2)
    assert asyncio.run(s2.prune([1, 2])) == []


def test_a_release_directory_without_a_record_is_collected_again(tmp_path, monkeypatch):
    s = static.StaticFiles(tmp_path / "state")
    release = static.release_for(info(tmp_path), {}, "p", tmp_path / "omerodir")
    (release.directory / "webgateway").mkdir(parents=True)
    (release.directory / "webgateway" / "half.css").write_text("interrupted")
    ran = []

    async def fake_collectstatic(venv_info, omerodir):
        assert not release.directory.exists()  # the half-done directory went first
        (release.directory / "webgateway").mkdir(parents=True)
        (release.directory / "webgateway" / "whole.css").write_text("whole")
        ran.append(omerodir)

    monkeypatch.setattr(static, "_collectstatic", fake_collectstatic)
    assert asyncio.run(s.collect(1, release, info(tmp_path), tmp_path / "view")) is True
    assert ran == [tmp_path / "view"]
    assert asyncio.run(s.collect(2, release, info(tmp_path), tmp_path / "view")) is False  # recorded whole now
    assert ran == [tmp_path / "view"]


def test_links_planted_in_static_root_are_never_followed(tmp_path):
    s = static.StaticFiles(tmp_path / "state")
    release = static.release_for(info(tmp_path), {}, "p", tmp_path / "omerodir")
    collected(s, 1, release, {"webgateway/a.css": "x"})
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep")
    root = release.static_root
    (root / "planted").symlink_to(victim)  # not a name of the release: removed as a link, not followed
    (root / "release-0123456789ab").symlink_to(victim)  # looks like a release: pruned as a link
    s.cut_over(1)
    asyncio.run(s.prune([1]))
    assert (victim / "precious").read_text() == "keep"
    assert not os.path.lexists(root / "planted") and not os.path.lexists(root / "release-0123456789ab")


def test_a_cutover_that_cannot_write_logs_and_keeps_serving(tmp_path, monkeypatch):
    s = static.StaticFiles(tmp_path / "state")
    release = static.release_for(info(tmp_path), {}, "p", tmp_path / "omerodir")
    collected(s, 1, release, {"webgateway/a.css": "x"})

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "symlink", refuse)
    s.cut_over(1)  # no exception: the release's own URLs serve regardless
    assert s._record().get("current") is None


@pytest.mark.parametrize("name, ok", [("release-5.33.2-0123456789ab", True), ("release-0123456789ab", True),
                                      ("webgateway", False), ("release-5.33.2-0123456789ab/x", False),
                                      ("release-5.33.2-0123456789abc", False)])
def test_release_names(name, ok):
    assert bool(static.RELEASE.fullmatch(name)) is ok
