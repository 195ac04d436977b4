"""An original file replaced after labeling is neither served nor exported.

A folder job's dataset references the original files (``save_images: auto``).  Replacing an already
labeled input with a symlink to ``<state_dir>/web-token`` served the token's bytes on the review page and
wrote them into an export, and any replacement put other pixels under labels a person already reviewed.
The index keeps the labeled file's sha256; an original is used only while its bytes still match.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from edgelabel.edge.export import ExportError, export_dataset
from edgelabel.edge.review import ReviewStore
from tests.conftest import IMAGES
from tests.helpers import run_edgelabel


def test_a_swapped_original_is_not_served_or_exported(tmp_path: Path, assets: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(IMAGES / name, inputs / name)
    state = tmp_path / "state"
    proc = run_edgelabel("run", "--source", str(inputs), "--model", str(assets / "models" / "yolox_nano.onnx"),
                         "--mqtt", "off", "--state-dir", str(state), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    secret = state / "secret.txt"
    secret.write_bytes(b"Zq9-the-operator-token")
    dataset = state / "dataset"

    store = ReviewStore.open(dataset)
    try:
        rows = {Path(r["image_path"]).name: r["id"] for r in store.index.select("1", [], order="rowid")}
        assert set(rows) == {"bus.jpg", "zidane.jpg"}, rows  # the originals are referenced, not copied
        bus = rows["bus.jpg"]
        data, suffix = store.image_bytes(bus) or (b"", "")
        assert data == (IMAGES / "bus.jpg").read_bytes() and suffix == ".jpg"

        (inputs / "bus.jpg").unlink()
        (inputs / "bus.jpg").symlink_to(secret)  # the swap
        assert store.image_bytes(bus) is None
        assert store.item(bus)["image_available"] is False
        result = export_dataset(store.index, "yolo", tmp_path / "export.zip",
                                states=("auto_accepted", "needs_review", "accepted", "corrected"))
        assert result.missing == [bus] and result.images == 1
        with zipfile.ZipFile(tmp_path / "export.zip") as z:
            assert all(b"Zq9" not in z.read(n) for n in z.namelist())

        (inputs / "bus.jpg").unlink()
        (inputs / "bus.jpg").write_bytes(b"\xff\xd8\xff other pixels under the reviewed labels")  # a rewrite
        assert store.image_bytes(bus) is None

        shutil.copy(IMAGES / "bus.jpg", inputs / "bus.jpg")  # the labeled bytes again: served again
        assert store.image_bytes(bus) is not None
    finally:
        store.close()


def test_an_original_swapped_during_an_export_is_not_exported(tmp_path: Path, assets: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The export checked each original when it began and copied (hard-linked) it by path later: a symlink
    swapped in between put another file's bytes into the zip.  Now the bytes copied are the bytes checked,
    read again without following a symlink into the daemon's own files."""
    import edgelabel.edge.export as export_mod

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(IMAGES / "bus.jpg", inputs / "bus.jpg")
    state = tmp_path / "state"
    proc = run_edgelabel("run", "--source", str(inputs), "--model", str(assets / "models" / "yolox_nano.onnx"),
                         "--mqtt", "off", "--state-dir", str(state), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    secret = state / "web-token"
    secret.write_bytes(b"Zq9-the-operator-token")
    store = ReviewStore.open(state / "dataset")
    real_collect = export_mod.collect

    def collect_then_swap(*args: Any, **kwargs: Any) -> Any:
        found = real_collect(*args, **kwargs)  # checked: the labeled bytes
        (inputs / "bus.jpg").unlink()
        (inputs / "bus.jpg").symlink_to(secret)  # the swap, after the check
        return found

    monkeypatch.setattr(export_mod, "collect", collect_then_swap)
    try:
        store.index.protected = (str(state),)
        with pytest.raises(ExportError, match="export again"):
            export_dataset(store.index, "yolo", tmp_path / "export.zip", states=("auto_accepted", "needs_review"))
        assert not (tmp_path / "export.zip").exists()
        assert not any(b"Zq9" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret)
    finally:
        store.close()


def test_an_original_of_a_row_from_before_hashes_is_still_read_through_the_guard(tmp_path: Path,
                                                                                  assets: Path) -> None:
    """A dataset row made before the index kept sha256s has nothing to compare with; its original must still
    be read the guarded way: an export hard-linked or copied the path as it was, so a symlink swapped in to
    the web token put the token into the zip."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(IMAGES / name, inputs / name)
    state = tmp_path / "state"
    proc = run_edgelabel("run", "--source", str(inputs), "--model", str(assets / "models" / "yolox_nano.onnx"),
                         "--mqtt", "off", "--state-dir", str(state), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    secret = state / "web-token"
    secret.write_bytes(b"Zq9-the-operator-token")

    store = ReviewStore.open(state / "dataset")
    store.index.protected = (str(state.resolve()),)  # as the daemon and the web page set it
    try:
        with store.index.lock, store.index.db:
            store.index.db.execute("UPDATE records SET image_sha256 = NULL")  # rows from before hashes
        rows = {Path(r["image_path"]).name: r["id"] for r in store.index.select("1", [], order="rowid")}
        assert store.image_bytes(rows["bus.jpg"]) is not None  # unswapped: still served and exported
        (inputs / "bus.jpg").unlink()
        (inputs / "bus.jpg").symlink_to(secret)
        assert store.image_bytes(rows["bus.jpg"]) is None
        out = tmp_path / "export.zip"
        result = export_dataset(store.index, "yolo", out, states=("auto_accepted", "needs_review"))
        assert result.missing == [rows["bus.jpg"]] and result.images == 1
        with zipfile.ZipFile(out) as z:
            assert all(b"Zq9" not in z.read(n) for n in z.namelist())
    finally:
        store.close()
