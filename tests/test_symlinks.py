"""Symlinks in an input folder, and the daemon's own files (``edge/sources/pathguard.py``).

A drop folder is written by others.  A symlink there to ``<state_dir>/web-token`` or to the dataset had the
daemon read its own secrets as an input, and a symlinked folder anywhere on the disk was labeled (and its
files referenced by the dataset, hence served by the review page).  Now: a symlink (file or folder) that
leads out of the folder is refused, listed in rejected.csv, unless ``follow_symlinks: true``; whatever leads
into the state folder, the dataset or a secret file is refused in any case, also when it is swapped in
between the listing and the read.
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgelabel.edge.config import SourceConfig, config_from_dict
from edgelabel.edge.frame import Frame
from edgelabel.edge.sinks.dataset import DatasetIndex
from edgelabel.edge.sources.folder import FolderSource
from edgelabel.edge.sources.image import ImageSource
from edgelabel.edge.sources.pathguard import protected_paths
from tests.conftest import IMAGES
from tests.helpers import run_edgelabel


class Layout:
    """in/ (the input folder), outside/ (elsewhere on the disk), state/ with a token and a dataset image."""

    def __init__(self, tmp: Path) -> None:
        self.inputs = tmp / "in"
        self.outside = tmp / "outside"
        self.state = tmp / "state"
        for d in (self.inputs, self.outside, self.state / "dataset" / "images"):
            d.mkdir(parents=True)
        shutil.copy(IMAGES / "bus.jpg", self.inputs / "a.jpg")
        shutil.copy(IMAGES / "zidane.jpg", self.outside / "far.jpg")
        (self.outside / "sub").mkdir()
        shutil.copy(IMAGES / "dog.jpg", self.outside / "sub" / "deep.jpg")
        self.token = self.state / "web-token.jpg"  # named like an image: only where it is matters
        shutil.copy(IMAGES / "street.jpg", self.token)
        shutil.copy(IMAGES / "highway.jpg", self.state / "dataset" / "images" / "kept.jpg")
        self.protected = (str(self.state.resolve()), str((self.state / "dataset").resolve()))

    def source(self, follow: bool = False, watch: bool = False) -> FolderSource:
        cfg = SourceConfig(uri=str(self.inputs), name="in", follow_symlinks=follow, watch=watch, watch_interval=0.05)
        src = FolderSource("in", cfg, str(self.inputs))
        src.protected = self.protected
        self.rejects: list[tuple[str, str]] = []
        src.on_reject = lambda path, why: self.rejects.append((path, why))
        return src


def read_all(src: FolderSource) -> list[Frame]:
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    return frames




def plant(lay: Layout) -> None:
    (lay.inputs / "far.jpg").symlink_to(lay.outside / "far.jpg")  # a file outside
    (lay.inputs / "elsewhere").symlink_to(lay.outside / "sub")  # a folder outside
    (lay.inputs / "token.jpg").symlink_to(lay.token)  # the daemon's secret
    (lay.inputs / "ds").symlink_to(lay.state / "dataset")  # the daemon's dataset, as a folder
    (lay.inputs / "same.jpg").symlink_to(lay.inputs / "a.jpg")  # stays inside: fine
    (lay.inputs / "loop").symlink_to(lay.inputs)  # a loop back to the folder itself


def test_symlinks_that_leave_the_folder_are_refused_by_default(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    plant(lay)
    frames = read_all(lay.source())
    assert sorted(Path(f.path).name for f in frames) == ["a.jpg", "same.jpg"]
    refused = {Path(p).name: why for p, why in lay.rejects}
    assert set(refused) == {"far.jpg", "elsewhere", "token.jpg", "ds"}, lay.rejects
    assert "outside the input folder" in refused["far.jpg"] and "follow_symlinks: true" in refused["far.jpg"]
    assert "folder" in refused["elsewhere"] and "follow_symlinks: true" in refused["elsewhere"]
    for secret in ("token.jpg", "ds"):
        assert "daemon's own files" in refused[secret] and "follow_symlinks" not in refused[secret]


def test_follow_symlinks_reads_them_but_never_the_daemons_own_files(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    plant(lay)
    frames = read_all(lay.source(follow=True))
    assert sorted(Path(f.path).name for f in frames) == ["a.jpg", "deep.jpg", "far.jpg", "same.jpg"]
    assert {Path(p).name for p, _ in lay.rejects} == {"token.jpg", "ds"}  # and the loop ended
    assert all("daemon's own files" in why for _, why in lay.rejects)


def test_a_refusal_is_reported_once_in_a_watched_folder(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    src = lay.source(watch=True)
    src.open()
    assert src.read() is not None  # a.jpg
    (lay.inputs / "late.jpg").symlink_to(lay.outside / "far.jpg")
    for _ in range(5):
        src._poll()
        src._report_refusals()
    assert [Path(p).name for p, _ in lay.rejects] == ["late.jpg"]
    src.close()


@pytest.mark.parametrize("follow", [False, True])
def test_a_symlink_swapped_in_after_the_listing_is_not_read(tmp_path: Path, follow: bool) -> None:
    """The listing saw plain files; before the read, one becomes a symlink to the token and a sub-folder a
    symlink to a folder elsewhere (an intermediate path component: only the opened file tells)."""
    lay = Layout(tmp_path)
    (lay.inputs / "sub").mkdir()
    shutil.copy(IMAGES / "dog.jpg", lay.inputs / "sub" / "deep.jpg")
    shutil.copy(IMAGES / "zidane.jpg", lay.inputs / "b.jpg")
    (lay.outside / "evil").mkdir()
    shutil.copy(IMAGES / "classroom.jpg", lay.outside / "evil" / "deep.jpg")
    src = lay.source(follow=follow)
    src.open()
    assert src.total() == 3
    (lay.inputs / "b.jpg").unlink()
    (lay.inputs / "b.jpg").symlink_to(lay.token)
    shutil.rmtree(lay.inputs / "sub")
    (lay.inputs / "sub").symlink_to(lay.outside / "evil")
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    got = [Path(f.path).name for f in frames]
    refused = {Path(p).name: why for p, why in lay.rejects}
    assert "b.jpg" not in got and "daemon's own files" in refused["b.jpg"]
    if follow:
        assert got == ["a.jpg", "deep.jpg"]  # followed on purpose
    else:
        assert got == ["a.jpg"] and "outside the input folder" in refused["deep.jpg"], lay.rejects
    assert not any(f.image.shape == (0,) for f in frames)


def test_a_hard_link_to_a_secret_file_is_refused(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    try:
        os.link(lay.token, lay.inputs / "hard.jpg")
    except OSError as exc:
        pytest.skip(f"no hard links here: {exc}")
    src = lay.source()
    src.protected = (*lay.protected, str(lay.token.resolve()))
    frames = read_all(src)
    assert [Path(f.path).name for f in frames] == ["a.jpg"]
    assert [Path(p).name for p, _ in lay.rejects] == ["hard.jpg"] and "hard link" in lay.rejects[0][1]


def test_an_input_folder_inside_the_state_folder_is_refused_at_open(tmp_path: Path) -> None:
    from edgelabel.edge.sources.base import SourceError

    lay = Layout(tmp_path)
    inner = lay.state / "in"
    inner.mkdir()
    src = FolderSource("in", SourceConfig(uri=str(inner), name="in"), str(inner))
    src.protected = lay.protected
    with pytest.raises(SourceError, match="daemon's own files"):
        src.open()
    image = ImageSource("one", SourceConfig(uri=str(lay.inputs / "t.jpg"), name="one"), str(lay.inputs / "t.jpg"))
    (lay.inputs / "t.jpg").symlink_to(lay.token)
    image.protected = lay.protected
    with pytest.raises(SourceError, match="daemon's own files"):
        image.open()


def test_protected_paths_name_the_state_folder_dataset_and_secret_files(tmp_path: Path) -> None:
    cfg = config_from_dict({
        "state_dir": str(tmp_path / "state"), "model": {"path": "m.onnx"},
        "sources": {"in": {"uri": str(tmp_path / "in"), "follow_symlinks": True}},
        "dataset": {"path": str(tmp_path / "ds")},
        "web": {"enabled": True, "token_file": str(tmp_path / "secrets" / "tok")},
        "mqtt": {"password_file": str(tmp_path / "secrets" / "mqtt-pw")},
    }, base_dir=tmp_path)
    assert cfg.sources["in"].follow_symlinks is True
    got = set(protected_paths(cfg))
    assert {str(tmp_path / "state"), str(tmp_path / "ds"), str(tmp_path / "secrets" / "tok"),
            str(tmp_path / "secrets" / "mqtt-pw")} <= got


def test_a_dataset_original_swapped_for_a_symlink_into_the_state_folder_is_never_opened(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    index = DatasetIndex(lay.state / "dataset")
    index.protected = lay.protected
    (lay.inputs / "a.jpg").unlink()
    (lay.inputs / "a.jpg").symlink_to(lay.token)
    with pytest.raises(PermissionError, match="daemon's own files"):
        index.read_original(lay.inputs / "a.jpg")
    assert index.read_original(lay.outside / "far.jpg") == (IMAGES / "zidane.jpg").read_bytes()


def test_the_daemon_lists_refused_symlinks_in_rejected_csv(tmp_path: Path, assets: Path) -> None:
    """End to end: ``edgelabel run`` on a folder with symlinks out of it and into its own state folder."""
    lay = Layout(tmp_path)
    (lay.inputs / "far.jpg").symlink_to(lay.outside / "far.jpg")
    (lay.inputs / "elsewhere").symlink_to(lay.outside / "sub")
    (lay.inputs / "token.jpg").symlink_to(lay.token)
    config = tmp_path / "config.yaml"
    base = {
        "device_id": "links", "state_dir": str(lay.state),
        "model": {"path": str(assets / "models" / "yolox_nano.onnx"), "family": "yolox"},
        "sources": {"in": {"uri": f"{lay.inputs}/"}},
        "mqtt": {"enabled": False}, "dataset": {"enabled": True, "path": str(lay.state / "dataset")},
    }
    config.write_text(yaml.safe_dump(base))
    proc = run_edgelabel("run", "-c", str(config), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (lay.state / "rejected.csv").open(newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r["reason"] for r in csv.DictReader(fh)}
    assert set(rows) == {"far.jpg", "elsewhere", "token.jpg"}, rows
    assert "follow_symlinks: true" in rows["far.jpg"] and "daemon's own files" in rows["token.jpg"]
    assert "outside the input folder" in proc.stderr and "rejected.csv" in proc.stderr
    index = DatasetIndex(lay.state / "dataset")
    index.open()
    try:
        labeled = {Path(r["image_path"]).name for r in index.select("1", [], order="rowid")}
    finally:
        index.close()
    assert labeled == {"a.jpg"}, labeled


def test_the_frames_api_never_reads_an_original_swapped_for_a_symlink(tmp_path: Path) -> None:
    """``/api/frames/<id>.jpg`` of a folder job's record reads the original (its ``frame_path``): swapped for a
    symlink into the state folder it is refused unread, swapped for another picture it is not served."""
    import hashlib
    from types import SimpleNamespace

    from edgelabel.web.api import _stored_frame

    lay = Layout(tmp_path)
    cfg = config_from_dict({"state_dir": str(lay.state), "model": {"path": "m.onnx"},
                            "sources": {"in": {"uri": str(lay.inputs)}},
                            "dataset": {"path": str(lay.state / "dataset")}}, base_dir=tmp_path)
    ctx = SimpleNamespace(cfg=cfg)
    original = lay.inputs / "a.jpg"
    sha = hashlib.sha256(original.read_bytes()).hexdigest()
    assert _stored_frame(ctx, str(original), sha) is not None  # type: ignore[arg-type]
    original.unlink()
    original.symlink_to(lay.token)  # a picture too, but the daemon's own file
    assert _stored_frame(ctx, str(original), None) is None  # type: ignore[arg-type]
    original.unlink()
    original.symlink_to(lay.outside / "far.jpg")  # another picture: not the labeled bytes
    assert _stored_frame(ctx, str(original), sha) is None  # type: ignore[arg-type]


def test_a_symlink_to_a_device_is_never_opened_even_when_followed(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening some devices has effects (a watchdog starts counting down, a tape rewinds): refused unopened."""
    lay = Layout(tmp_path)
    (lay.inputs / "dev.jpg").symlink_to("/dev/zero")
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any, **kwargs: Any) -> int:
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    src = lay.source(follow=True)
    monkeypatch.setattr(os, "open", spy)
    frames = read_all(src)
    monkeypatch.undo()
    assert str(lay.inputs / "dev.jpg") not in opened and str(lay.inputs / "a.jpg") in opened
    assert [Path(f.path).name for f in frames] == ["a.jpg"]
    assert lay.rejects == [(str(lay.inputs / "dev.jpg"), "not a regular file (device)")]


def test_a_hard_link_to_a_secret_made_after_the_guard_or_kept_in_the_state_folder_is_refused(tmp_path: Path) -> None:
    """The generated TLS key and the account file are secrets too, and a secret file may appear after the source's
    guard was built (the account file at the first login): a hard link to any of them is never read."""
    from edgelabel.edge.sources.pathguard import PathGuard, read_checked

    cfg = config_from_dict({
        "state_dir": str(tmp_path / "state"), "model": {"path": "m.onnx"},
        "sources": {"in": {"uri": str(tmp_path / "in")}}, "dataset": {"path": str(tmp_path / "ds")},
        "web": {"enabled": True, "tls": "auto"},
    }, base_dir=tmp_path)
    (tmp_path / "in").mkdir()
    (tmp_path / "state").mkdir()
    guard = PathGuard(str(tmp_path / "in"), protected=protected_paths(cfg))
    for name in ("web-tls-key.pem", "web-accounts.sqlite", "web-token"):  # made after the guard, image bytes
        secret = tmp_path / "state" / name
        shutil.copy(IMAGES / "bus.jpg", secret)
        try:
            os.link(secret, tmp_path / "in" / f"{name}.jpg")
        except OSError as exc:
            pytest.skip(f"no hard links here: {exc}")
        with pytest.raises(PermissionError, match="hard link"):
            read_checked(tmp_path / "in" / f"{name}.jpg", guard)
    shutil.copy(IMAGES / "bus.jpg", tmp_path / "in" / "plain.jpg")
    assert read_checked(tmp_path / "in" / "plain.jpg", guard) == (IMAGES / "bus.jpg").read_bytes()
