"""benchmarks/suite_data.py on synthetic sources: the split is deterministic, stratified and grouped, manifests
are written and honoured, and emoji / emote / smiley / face folders never reach a prepared set."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support import REPO_ROOT as ROOT


def _load():
    spec = importlib.util.spec_from_file_location("suite_data", ROOT / "benchmarks" / "suite_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["suite_data"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sd = _load()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _icon(path: Path, seed: str, size: int) -> None:
    """A distinct RGBA drawing per seed: a coloured rectangle and an ellipse on a transparent canvas."""
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    px = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
    px[..., 3] = np.where(rng.random((size, size)) < 0.6, 255, 0)
    im = Image.fromarray(px, "RGBA")
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _split_of(folder: Path) -> dict[str, str]:
    """Output file name -> train/test."""
    return {p.name: p.parent.parent.name for p in folder.glob("*/*/*.png")}


# ------------------------------------------------------------------------------------------- split logic
def test_grouped_split_is_deterministic_stratified_and_grouped():
    labels, keys = [], []
    for cls, n in (("a", 60), ("b", 30), ("c", 90)):
        for i in range(n):
            labels.append(cls)
            keys.append((f"{cls}-base{i // 3}",))  # groups of three variants
    first = sd.grouped_split(labels, keys, seed=0, test_fraction=0.2)
    again = sd.grouped_split(labels, keys, seed=0, test_fraction=0.2)
    assert np.array_equal(first, again)
    other = sd.grouped_split(labels, keys, seed=1, test_fraction=0.2)
    assert not np.array_equal(first, other)  # the seed matters
    for cls, n in Counter(labels).items():
        test = sum(t for lab, t in zip(labels, first) if lab == cls)
        assert abs(test - 0.2 * n) <= 3, (cls, test, n)  # stratified (whole groups of 3)
    by_key: dict[str, set[bool]] = {}
    for k, t in zip(keys, first):
        by_key.setdefault(k[0], set()).add(bool(t))
    assert all(len(s) == 1 for s in by_key.values())  # a group never straddles the split


def test_groups_merge_transitively_and_small_classes_keep_both_splits():
    keys = [("x",), ("x", "y"), ("y",), ("z",), ("w",)]
    g = sd.groups_of(keys)
    assert g[0] == g[1] == g[2] and len({g[0], g[3], g[4]}) == 3
    labels = ["a", "a", "a", "a", "a", "b", "b"]
    keys = [("a1",), ("a1",), ("a2",), ("a3",), ("a4",), ("b1",), ("b2",)]
    split = sd.grouped_split(labels, keys)
    for cls in ("a", "b"):
        assert {bool(t) for lab, t in zip(labels, split) if lab == cls} == {False, True}
    assert split[0] == split[1]


def test_cap_classes_drops_tiny_and_caps_large():
    labels = ["big"] * 100 + ["mid"] * 20 + ["small"] * 10 + ["tiny"] * 2
    kept = sd.cap_classes(labels, min_class=5, cap_ratio=3)
    counts = Counter(labels[i] for i in kept)
    assert counts == {"big": 30, "mid": 20, "small": 10}
    assert kept == sd.cap_classes(labels, min_class=5, cap_ratio=3)


def test_forbidden_names_and_group_keys():
    for bad in ("emotes", "face-smile", "people/smilies", "Emoji", "emoticons", "smiley006"):
        assert sd.is_forbidden(*bad.split("/")), bad
    assert not sd.is_forbidden("actions", "edit-copy", "animals")
    assert sd.icon_key("folder-blue") == sd.icon_key("folder-red") == "folder"
    assert sd.icon_key("gnome-mime-text-x-python") == sd.icon_key("text-x-python")
    assert sd.clipart_base("arrow-down-blue_benji_pa_01") == sd.clipart_base("arrow-down-green_benji_p_01")
    assert sd.clipart_base("aiga_bar1") == sd.clipart_base("aiga_bar_")
    assert sd.icon_class("mimetypes", "image-png") == "mimetypes-content"
    assert sd.icon_class("mimetypes", "application-pdf") == "mimetypes-app"


# -------------------------------------------------------------------------------------- icons, end to end
CONTEXTS = ("actions", "apps", "devices", "places")


def _themes(tmp: Path):
    """Two synthetic themes, one per layout; names repeat across themes and sizes; emoji bait included."""
    a, b = tmp / "src" / "alpha", tmp / "src" / "beta"
    for ctx in CONTEXTS:
        for i in range(12):
            name = f"{ctx}-icon{i}"
            for size in (16, 32, 48):  # SIZE/CONTEXT layout (Oxygen, Tango)
                _icon(a / f"{size}x{size}" / ctx / f"{name}.png", f"a{name}{size}", size)
            if i % 2 == 0:  # CONTEXT/SIZE layout (Faenza); same names as alpha
                _icon(b / ctx / "32" / f"{name}.png", f"b{name}", 32)
    for size in (16, 32):
        for i in range(12):  # FORBIDDEN: must never appear
            _icon(a / f"{size}x{size}" / "emotes" / f"wink{i}.png", f"e{i}{size}", size)
            _icon(b / "emotes" / str(size) / f"grin{i}.png", f"g{i}{size}", size)
    _icon(a / "32x32" / "actions" / "face-smile.png", "fs", 32)
    _icon(a / "32x32" / "actions" / "emoji-cat.png", "ec", 32)
    _icon(a / "32x32" / "animations" / "process-working.png", "pw", 32)
    return (sd.IconTheme("alpha", "no-such-package-alpha", a, "test"),
            sd.IconTheme("beta", "no-such-package-beta", b, "test"))


@pytest.fixture()
def icons(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, "ICON_THEMES", _themes(tmp_path))
    spec = dataclasses.replace(sd.SUITE["icons"], size=(16, 16), packages=(),
                               params={"min_class": 5, "cap_ratio": 3})
    monkeypatch.setitem(sd.SUITE, "icons", spec)
    return tmp_path


def test_prepare_icons_layout_manifest_groups_and_exclusions(icons):
    out = sd.prepare("icons", icons / "suite")
    assert out == icons / "suite" / "icons"
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("name", "source", "licence", "num_classes", "counts", "image_size", "colour", "labels",
                "split", "raw_pixel_knn", "excluded"):
        assert key in manifest, key
    assert manifest["num_classes"] == len(CONTEXTS)
    assert manifest["image_size"] == [16, 16] and manifest["mode"] == "RGB"
    files = sorted(out.glob("*/*/*.png"))
    assert len(files) == manifest["counts"]["train"] + manifest["counts"]["test"] == 12 * 4 + 6 * 4
    assert {p.parent.name for p in files} == set(CONTEXTS)  # no emotes, no animations
    assert not [p for p in files if sd.FORBIDDEN.search(p.name)]  # face-smile, emoji-cat, wink, grin: gone
    with Image.open(files[0]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"
    # the same icon name (either theme) is never in both splits
    splits: dict[str, set[str]] = {}
    for name, split in _split_of(out).items():
        splits.setdefault(name.split("__")[-1], set()).add(split)
    assert all(len(s) == 1 for s in splits.values())
    for cls in CONTEXTS:
        assert manifest["per_class"][cls]["train"] > 0 and manifest["per_class"][cls]["test"] > 0
    knn = manifest["raw_pixel_knn"]
    assert 0.0 <= knn["knn_acc"] <= 1.0 and knn["num_test"] == manifest["counts"]["test"]
    # the loader reads the layout
    from excb.data.datasets import build_dataset

    ds = build_dataset(str(out), split="test", labelled=True)
    assert len(ds) == manifest["counts"]["test"] and list(ds.classes) == sorted(CONTEXTS)


def test_prepare_is_deterministic_and_idempotent(icons):
    a = sd.prepare("icons", icons / "one")
    b = sd.prepare("icons", icons / "two")
    assert _split_of(a) == _split_of(b)
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert sd.is_prepared("icons", icons / "one")
    sd.prepare("icons", icons / "one")
    assert (a / "manifest.json").stat().st_mtime_ns == stamp  # skipped: manifest matches
    next(a.glob("train/*/*.png")).unlink()  # a missing file: rebuilt
    assert not sd.is_prepared("icons", icons / "one")
    sd.prepare("icons", icons / "one")
    assert _split_of(a) == _split_of(b)


# ------------------------------------------------------------------------------------- openclipart, synthetic
def test_prepare_openclipart_excludes_smilies_and_groups_variants(tmp_path, monkeypatch):
    src = tmp_path / "png"
    for folder, n in (("animals/birds", 10), ("food/fruit", 10), ("plants", 10), ("people/stickmen", 10)):
        for i in range(n):
            _icon(src / folder / f"thing{i // 2}_author_0{i % 2 + 1}.png", f"{folder}{i}", 40)
    for i in range(10):
        _icon(src / "people" / "smilies" / f"smiley{i:03d}.png", f"s{i}", 40)  # FORBIDDEN folder
        _icon(src / "unsorted" / f"x{i}.png", f"u{i}", 40)  # not in the class table
    monkeypatch.setattr(sd, "OPENCLIPART_ROOT", src)
    spec = dataclasses.replace(sd.SUITE["openclipart"], size=(24, 24), packages=(),
                               params={"min_class": 5, "cap_ratio": 3})
    monkeypatch.setitem(sd.SUITE, "openclipart", spec)
    out = sd.prepare("openclipart", tmp_path / "suite")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["animals", "food", "people", "plants"]
    names = _split_of(out)
    assert len(names) == 40 and not any("smil" in n or "unsorted" in n for n in names)
    by_base: dict[str, set[str]] = {}
    for name, split in names.items():
        by_base.setdefault(name.rsplit("_", 2)[0], set()).add(split)  # thingN_author_01 / _02 share a base
    assert all(len(s) == 1 for s in by_base.values())


def test_opencv_digits_sheet_labels(tmp_path, monkeypatch):
    sheet = np.zeros((1000, 2000), dtype=np.uint8)
    for row in range(50):
        sheet[row * 20:(row + 1) * 20] = row  # every cell of sheet row r holds the value r
    Image.fromarray(sheet, "L").save(tmp_path / "digits.png")
    monkeypatch.setattr(sd, "OPENCV_DIGITS_PNG", tmp_path / "digits.png")
    built = sd.build_opencv_digits(sd.SUITE["opencv-digits"])
    assert len(built.items) == 5000
    for item in built.items[::97]:
        row = int(np.asarray(item.render())[0, 0])
        assert item.label == str(row // 5)
    assert Counter(i.label for i in built.items) == {str(d): 500 for d in range(10)}


def test_the_validation_view_is_carved_from_train_grouped_and_leaves_test_alone(icons):
    """Issue 28 item 1: NAME.val/train is the training split without the validation images, NAME.val/test is
    them; the same icon name never straddles the two, and the test split is exactly the set's own."""
    root = icons / "suite"
    out = sd.prepare("icons", root)
    view = Path(sd.data_source("icons", root, "val"))
    assert view == root / "icons.val" and sd.data_source("icons", root, "test") == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    val_files = {p.relative_to(view / "test").as_posix() for p in view.glob("test/*/*.png")}
    rest = {p.relative_to(view / "train").as_posix() for p in view.glob("train/*/*.png")}
    train = {p.relative_to(out / "train").as_posix() for p in out.glob("train/*/*.png")}
    assert val_files and rest and not val_files & rest and val_files | rest == train
    assert manifest["val"]["counts"] == {"train": len(rest), "val": len(val_files)}
    assert manifest["counts"]["test"] == len(list(out.glob("test/*/*.png")))  # untouched
    names = lambda files: {f.split("__")[-1] for f in files}  # noqa: E731
    assert not names(val_files) & names(rest)  # grouped as the test split is
    assert {f.split("/")[0] for f in val_files} == {f.split("/")[0] for f in rest}  # every class in both
    from excb.evaluation.splits import labelled_splits

    tr, va = labelled_splits(str(view), None)
    assert (len(tr), len(va)) == (len(rest), len(val_files))
    next(view.glob("test/*/*.png")).unlink()  # a damaged view is rebuilt
    assert not sd.is_prepared("icons", root)
    sd.prepare("icons", root)
    assert {p.relative_to(view / "test").as_posix() for p in view.glob("test/*/*.png")} == val_files
