"""Labelled data sets of the representation-quality suite (issue 12, item 3), prepared from registry packages.

Every set except Fashion-MNIST becomes a folder the project's loader reads as it is::

    ROOT/NAME/train/CLASS/*.png   ROOT/NAME/test/CLASS/*.png   ROOT/NAME/manifest.json

``build_dataset(str(ROOT/NAME), split="train"|"test", labelled=True)`` gives the labelled splits (the class is
the first folder under train/ or test/). Fashion-MNIST is read natively from its IDX files (source string
``fashion-mnist``); it only gets a manifest. ``data_source(name, root)`` returns the string to hand to
``build_dataset`` for any set.

Every set also gets a validation split carved from its training split, grouped and stratified as the test split
is (seed 1, 20% of train), as its own folder ``ROOT/NAME.val/{train,test}``: its train/ is the training split
without the validation images, its test/ is the validation images. ``data_source(name, root, split="val")``
returns it. Every tuning choice is made on it; the test split is scored once per committed recipe
(benchmarks/RESULTS.md, "Quality suite").

  python benchmarks/suite_data.py prepare [--root DIR] [--only NAME ...] [--force]
  python benchmarks/suite_data.py list

The default root is ~/.cache/excb/suite. Preparing is idempotent: a set whose manifest matches the current
recipe (recipe version, parameters, source package version) and whose files are all there is skipped.
scripts/prepare-suite.sh installs the Debian packages first.

Splits are deterministic (seed 0), stratified by class (~80/20) and grouped: items sharing a group key (the
same icon name in any theme or size, the same clip-art drawing numbered _01/_02, identical pixels, the same
coarse 8x8 difference hash) always land in the same split, so near-duplicates never straddle train and test.

Emoji image sets of any vendor, and every emoji / emote / smiley / face folder or icon inside the sources used
here, are reserved for independent checks of this project: they are excluded in code (FORBIDDEN below).

Each manifest carries the raw-pixel kNN baseline (k=20, cosine, DINO exp(sim/0.07) weighting, the project's
``excb.evaluation.metrics``) on the prepared folders at the set's native size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops

RECIPE_VERSION = 4
DEFAULT_ROOT = Path("~/.cache/excb/suite")
SEED = 0
TEST_FRACTION = 0.2
VAL_SEED = 1
VAL_FRACTION = 0.2  # of the training split: the validation split every tuning choice is made on
VAL_SUFFIX = ".val"  # ROOT/NAME.val/{train,test}: train minus val, and val, as a folder the loader reads
VAL_LIST = "val.txt"  # ROOT/NAME/val.txt: the validation files, relative to ROOT/NAME (Fashion-MNIST: indices)
SPLITS = ("val", "test")
KNN_K = 20
KNN_TEMPERATURE = 0.07
MAX_SOURCE_PIXELS = 16_000_000  # larger source drawings are skipped (slow to decode; one is 623 Mpx)
NEAR_BITS = 2  # perceptual hashes this close put two images in one group (one split)
SMOKE_THRESHOLD = 0.97  # raw pixels above this: the set can only catch breakage, not judge representations

# Reserved for independent checks of this project (docs/data.md): no emoji image set of any vendor, and no
# emoji / emote / smiley / face folder or icon inside any source used here. Matched against every folder name
# and every file stem of a source, case-insensitively; a match is dropped before anything else happens. It is
# deliberately broad (it also drops the odd "interface" or "surface" icon).
FORBIDDEN = re.compile(r"emoji|emot|smil|face", re.IGNORECASE)

# Debian sources. Module-level so tests can point them at synthetic trees.
OPENCV_DIGITS_PNG = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IconTheme:
    name: str
    package: str
    root: Path
    licence: str


ICON_THEMES: tuple[IconTheme, ...] = (
    IconTheme("oxygen", "oxygen-icon-theme", Path("/usr/share/icons/oxygen/base"), "LGPL-3+"),
    IconTheme("faenza", "faenza-icon-theme", Path("/usr/share/icons/Faenza"), "GPL-3+"),
    IconTheme("tango", "tango-icon-theme", Path("/usr/share/icons/Tango"), "public domain"),
)
# freedesktop contexts used as classes. Not used: emotes (FORBIDDEN), animations (spinner frames, 1-2 per
# theme), applets / stock / extras (theme-specific folders of a few dozen app-specific icons).
ICON_CONTEXTS = ("actions", "apps", "categories", "devices", "emblems", "mimetypes", "places", "status")

# openclipart topic folders -> class. A file belongs to the class of the longest matching prefix; a prefix
# mapped to None is dropped. Folders not listed (shapes/stars: generated variations, special/: gradients and
# patterns, computer/icons: icon themes, recreation/games/cards: four near-identical decks, unsorted/, ...)
# are not used.
OPENCLIPART_CLASSES: dict[str, str | None] = {
    "animals": "animals",
    "food": "food",
    "plants": "plants",
    "transportation": "vehicles",
    "transportation/vehicles": "vehicles",
    "transportation/boating": "vehicles",
    "transportation/aiga-symbols": "pictograms",
    "transportation/roadsigns": "pictograms",
    "signs_and_symbols/map_symbols": "pictograms",
    "signs_and_symbols/flags": "flags",
    "signs_and_symbols/flags/semaphore": None,  # people holding flags, not flags
    "people": "people",
    "people/stickmen": "people",
    "people/smilies": None,  # FORBIDDEN (smileys); also caught by the FORBIDDEN pattern
    "people/bodypart": None,  # eyes, mouths, hands: close to faces, left out
    "people/clothing": "clothing",
    "buildings": "buildings",
    "recreation/music": "music",
    "recreation/sports": "sports",
    "tools": "tools",
    "tools/toys": None,
    "tools/weapons": None,  # bombs, bullet holes: not tools
    "geography": "geography",
    "office": "office",
    "computer/hardware": "electronics",
    "electronics": "electronics",
    "shapes/arrows": "arrows",
}


# --------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class SuiteSet:
    """One data set of the suite: what it is and how the suite reads it."""

    name: str
    description: str
    colour: bool
    size: tuple[int, int]
    packages: tuple[str, ...]  # Debian packages (scripts/prepare-suite.sh installs them)
    licence: str
    split: str
    native_source: str | None = None  # read by build_dataset directly (no folder)
    smoke: bool = False  # raw pixels already > 97%: catches breakage only
    params: dict[str, Any] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return self.description


SUITE: dict[str, SuiteSet] = {
    s.name: s for s in (
        SuiteSet("fashion-mnist",
                 "Fashion-MNIST, 10 clothing classes, 28x28 grey; read natively as source 'fashion-mnist'. The "
                 "suite uses the full official split (60,000 train / 10,000 test); raw pixels 84.6% kNN.",
                 colour=False, size=(28, 28), packages=("dataset-fashion-mnist",), licence="MIT",
                 split="official (60,000 / 10,000), full", native_source="fashion-mnist"),
        SuiteSet("opencv-digits",
                 "OpenCV's digits.png sheet cut into 5,000 handwritten digits, 10 classes, 20x20 grey. Smoke "
                 "set: raw pixels reach ~96% (just under the 97% line, but saturated like every digit set).",
                 colour=False, size=(20, 20), packages=("opencv-doc",), licence="Apache-2.0 AND BSD-3-Clause",
                 split="stratified 80/20, seed 0", smoke=True),
        SuiteSet("uci-digits",
                 "scikit-learn's UCI digits, 1,797 images, 10 classes, 8x8 grey (0-16 scaled to 0-255). Smoke set: "
                 "raw pixels reach ~98%.",
                 colour=False, size=(8, 8), packages=(), licence="CC BY 4.0",
                 split="stratified 80/20, seed 0", smoke=True),
        SuiteSet("icons",
                 "Desktop icons from three themes (Oxygen, Faenza, Tango), labelled by freedesktop context "
                 "(mimetypes split into content vs application types), 9 classes, ~1,000 images, 32x32 colour "
                 "on white. Hard: raw pixels ~39%.",
                 colour=True, size=(32, 32),
                 packages=tuple(t.package for t in ICON_THEMES), licence="; ".join(
                     f"{t.name}: {t.licence}" for t in ICON_THEMES),
                 split="stratified, grouped by icon name, ~80/20, seed 0",
                 params={"min_class": 40, "cap_ratio": 3}),
        SuiteSet("openclipart",
                 "Open Clip Art Library drawings labelled by topic folder, 16 classes, ~1,660 images, 64x64 "
                 "colour on white (cropped to content, aspect kept). Hard and noisy: raw pixels ~24%.",
                 colour=True, size=(64, 64), packages=("openclipart-png",),
                 licence="public domain (Creative Commons Public Domain Dedication)",
                 split="stratified, grouped by drawing base name, ~80/20, seed 0",
                 params={"min_class": 50, "cap_ratio": 3}),
    )
}


def data_source(name: str, root: str | Path | None = None, split: str = "test") -> str:
    """The ``build_dataset`` source string of a suite set: its folder (or native source), whose test/ is the test
    split; with ``split="val"`` the validation view, whose train/ lacks the validation images and whose test/ is
    them."""
    spec = _spec(name)
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
    base = Path(root or DEFAULT_ROOT).expanduser()
    if split == "val":
        return str(base / f"{name}{VAL_SUFFIX}")
    if spec.native_source:
        return spec.native_source
    return str(base / name)


def _spec(name: str) -> SuiteSet:
    if name not in SUITE:
        raise KeyError(f"unknown suite data set {name!r}; known: {', '.join(SUITE)}")
    return SUITE[name]


# ------------------------------------------------------------------------------------------------ items
@dataclass
class Item:
    """One image to write: its class, a unique file stem, its group keys and how to render it."""

    label: str
    stem: str
    keys: tuple[str, ...]
    render: Callable[[], Image.Image | None]
    origin: str = ""


class SourceMissing(RuntimeError):
    """A Debian package (or other source) the set needs is not installed."""


def _need(path: Path, package: str) -> Path:
    if not path.exists():
        raise SourceMissing(f"{path} not found: install the Debian package {package} "
                            f"(scripts/prepare-suite.sh does)")
    return path


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def is_forbidden(*parts: str) -> bool:
    """True when any folder name or file stem is an emoji / emote / smiley / face one (see FORBIDDEN)."""
    return any(FORBIDDEN.search(p) for p in parts)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"


# ------------------------------------------------------------------------------------------ split logic
class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def groups_of(keys: Sequence[Iterable[str]]) -> list[int]:
    """Group id per item (the smallest member index): items sharing any key are in one group, transitively."""
    uf = _UnionFind(len(keys))
    first: dict[str, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            if k in first:
                uf.union(first[k], i)
            else:
                first[k] = i
    return [uf.find(i) for i in range(len(keys))]


def grouped_split(labels: Sequence[str], keys: Sequence[Iterable[str]], seed: int = SEED,
                  test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Boolean ``is_test`` per item: deterministic, stratified by class, grouped by shared keys.

    Each group counts towards the class most of its items have (ties: the smallest class name). Per class,
    the groups are visited in a seeded order (seed and class name) and go to test while they fit in
    round(test_fraction * class size); every class with two or more groups gets at least one test group and
    keeps at least one train group.
    """
    if len(labels) != len(keys):
        raise ValueError("labels and keys: one entry per item")
    gid = groups_of(keys)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(gid):
        members[g].append(i)
    by_class: dict[str, list[int]] = defaultdict(list)
    for g, idx in members.items():
        counts = Counter(labels[i] for i in idx)
        top = max(counts.values())
        by_class[min(c for c, n in counts.items() if n == top)].append(g)
    is_test = np.zeros(len(labels), dtype=bool)
    for cls in sorted(by_class):
        groups = sorted(by_class[cls])
        size = {g: len(members[g]) for g in groups}
        total = sum(size.values())
        target = int(round(test_fraction * total))
        rng = np.random.default_rng([seed, zlib.crc32(cls.encode())])
        order = [groups[j] for j in rng.permutation(len(groups))]
        chosen: list[int] = []
        taken = 0
        for g in order:
            if taken + size[g] <= target:
                chosen.append(g)
                taken += size[g]
        if len(groups) >= 2 and not chosen:
            chosen = [min(order, key=lambda g: size[g])]  # the smallest group (first in seeded order on ties)
        if len(chosen) == len(groups) and len(groups) >= 2:
            chosen = chosen[:-1]
        for g in chosen:
            is_test[members[g]] = True
    return is_test


def val_of_train(labels: Sequence[str], keys: Sequence[Iterable[str]], is_test: np.ndarray) -> np.ndarray:
    """Boolean ``is_val`` per item: ``VAL_FRACTION`` of the training items (``~is_test``), split off by
    :func:`grouped_split` (stratified, grouped by the same keys, seed ``VAL_SEED``); test items are never val."""
    train = np.flatnonzero(~np.asarray(is_test, dtype=bool))
    sub = grouped_split([labels[i] for i in train], [keys[i] for i in train], VAL_SEED, VAL_FRACTION)
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[train[sub]] = True
    return is_val


def _val_manifest(train: int, val: int) -> dict[str, Any]:
    return {"method": "carved from the training split: stratified by class, grouped as the test split is",
            "seed": VAL_SEED, "fraction": VAL_FRACTION, "folder": f"NAME{VAL_SUFFIX}",
            "counts": {"train": train - val, "val": val}}


def cap_classes(labels: Sequence[str], min_class: int, cap_ratio: float, seed: int = SEED) -> list[int]:
    """Indices kept: classes under ``min_class`` dropped, the rest capped at ``cap_ratio`` x the smallest
    kept class by a seeded choice (per class), in their original order."""
    counts = Counter(labels)
    kept = {c: n for c, n in counts.items() if n >= min_class}
    if not kept:
        return []
    cap = int(cap_ratio * min(kept.values()))
    keep: list[int] = []
    for cls in sorted(kept):
        idx = [i for i, c in enumerate(labels) if c == cls]
        if len(idx) > cap:
            rng = np.random.default_rng([seed, zlib.crc32(cls.encode()), 1])
            idx = sorted(np.asarray(idx)[rng.choice(len(idx), cap, replace=False)].tolist())
        keep.extend(idx)
    return sorted(keep)


def dhash(image: Image.Image) -> int:
    """64-bit perceptual hash: signs of horizontal brightness differences on a 9x8 grey thumbnail."""
    g = np.asarray(image.convert("L").resize((9, 8), Image.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def near_pairs(hashes: Sequence[int], max_bits: int = NEAR_BITS, min_info: int = 8,
               chunk: int = 256) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose 64-bit hashes differ in at most ``max_bits`` bits. Hashes with fewer than
    ``min_info`` set (or unset) bits describe flat images (stripes, blobs) and pair with nothing: they would
    chain unrelated drawings into one group."""
    h = np.asarray(hashes, dtype=np.uint64)
    ones = np.array([bin(int(v)).count("1") for v in hashes], dtype=np.int64)
    informative = (ones >= min_info) & (ones <= 64 - min_info)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), chunk):
        x = h[start:start + chunk, None] ^ h[None, :]
        bits = np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)
        close = (bits <= max_bits) & informative[start:start + chunk, None] & informative[None, :]
        for a, b in zip(*np.nonzero(close)):
            if start + a < b:
                pairs.append((int(start + a), int(b)))
    return pairs


# ---------------------------------------------------------------------------------------------- rendering
def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB, transparency composited onto ``background``."""
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def fit_square(im: Image.Image, size: int, background: tuple[int, int, int] = (255, 255, 255),
               crop: bool = False, margin: int = 0) -> Image.Image | None:
    """Flatten onto ``background``, optionally crop to the non-background box, scale the longer side to
    ``size - 2*margin`` (aspect kept) and centre on a ``size`` x ``size`` canvas. None if nothing is drawn."""
    rgb = _flatten(im, background)
    if crop:
        box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, background)).getbbox()
        if box is None:
            return None
        rgb = rgb.crop(box)
    inner = size - 2 * margin
    w, h = rgb.size
    scale = inner / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != rgb.size:
        rgb = rgb.resize(new, Image.LANCZOS, reducing_gap=3.0 if scale < 0.5 else None)
    out = Image.new("RGB", (size, size), background)
    out.paste(rgb, ((size - new[0]) // 2, (size - new[1]) // 2))
    return out


def _pixels(path: Path) -> int:
    """Width x height from the file header (no decoding); unreadable or bomb-sized files count as huge."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size[0] * im.size[1]
    except (OSError, Image.DecompressionBombError):
        return sys.maxsize


def _open_file(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.copy() if im.mode != "P" else im.convert("RGBA")


# ---------------------------------------------------------------------------------------------- builders
@dataclass
class Built:
    items: list[Item]
    source: dict[str, Any]
    labels_from: str
    grey: bool
    perceptual_groups: bool
    excluded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _array_items(images: np.ndarray, labels: np.ndarray, prefix: str) -> list[Item]:
    items = []
    for i, (x, y) in enumerate(zip(images, labels)):
        stem = f"{prefix}{i:05d}"
        items.append(Item(str(int(y)), stem, (stem,), lambda x=x: Image.fromarray(x, mode="L"), origin=stem))
    return items


def build_opencv_digits(spec: SuiteSet) -> Built:
    path = _need(OPENCV_DIGITS_PNG, "opencv-doc")
    with Image.open(path) as im:
        sheet = np.asarray(im.convert("L"))
    if sheet.shape != (1000, 2000):
        raise ValueError(f"{path}: expected a 2000x1000 sheet, got {sheet.shape[1]}x{sheet.shape[0]}")
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3)  # [row, col, 20, 20]
    images = cells.reshape(5000, 20, 20).copy()
    labels = np.repeat(np.arange(50) // 5, 100)  # 5 sheet rows per digit, 0-9 in order
    return Built(_array_items(images, labels, "cell"),
                 {"package": "opencv-doc", "version": package_version("opencv-doc"), "path": str(path)},
                 "cell (row r, column c) of the 50x100 sheet of 20x20 cells has digit r // 5 (5 rows per "
                 "digit, 0-9 in order); file cellNNNNN = r * 100 + c", grey=True, perceptual_groups=False)


def build_uci_digits(spec: SuiteSet) -> Built:
    import sklearn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Built(_array_items(images, bunch.target, "digit"),
                 {"package": "scikit-learn (PyPI)", "version": sklearn.__version__,
                  "path": "sklearn.datasets.load_digits()"},
                 "load_digits().target; pixels 0-16 scaled by 255/16 and rounded. The project's native source "
                 "'digits' reads the same images with a different (unstratified) 80/20 split",
                 grey=True, perceptual_groups=False)


def _size_of(part: str) -> int | None:
    m = re.fullmatch(r"(\d+)(?:x\d+)?(?:@\d+x)?", part)
    return int(m.group(1)) if m else None


def icon_class(context: str, name: str) -> str:
    """Class of an icon: its context; mimetypes split into content types (text, image, audio, video) and the
    rest (applications, archives, office documents, ...)."""
    if context != "mimetypes":
        return context
    base = re.sub(r"^gnome-mime-", "", name)
    return "mimetypes-content" if re.match(r"(text|image|audio|video)[-_]", base) else "mimetypes-app"


COLOUR_WORDS = frozenset("black blue brown cyan dark gray green grey light magenta orange pink purple red violet "
                         "white yellow".split())


def icon_key(name: str) -> str:
    """Group key of an icon name: the same name in any theme or size, old ``gnome-mime-`` aliases and colour
    variants (Oxygen's folder-blue, folder-red, ...) all share one key."""
    tokens = re.split(r"[-_]", re.sub(r"^gnome-mime-", "", name.lower()))
    kept = [t for t in tokens if t not in COLOUR_WORDS]
    return "-".join(kept or tokens)


def scan_icon_theme(theme: IconTheme, target: int) -> dict[tuple[str, str], Path]:
    """(context, icon name) -> the PNG to render: the target size if drawn, else the smallest larger one,
    else the largest smaller one. Both layouts (SIZE/CONTEXT and CONTEXT/SIZE) are understood."""
    found: dict[tuple[str, str], dict[int, Path]] = defaultdict(dict)
    for dirpath, dirnames, filenames in os.walk(theme.root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(theme.root).parts
        sizes = [s for s in (_size_of(p) for p in rel) if s is not None]
        contexts = [p for p in rel if _size_of(p) is None]
        if len(sizes) != 1 or len(contexts) != 1:
            continue
        context = contexts[0]
        # FORBIDDEN: emotes / emoji / smiley / face folders of icon themes are reserved for independent checks.
        if is_forbidden(context) or context not in ICON_CONTEXTS:
            continue
        for f in sorted(filenames):
            if not f.endswith(".png"):
                continue
            name = f[:-4]
            if is_forbidden(name):  # e.g. face-smile in actions/: FORBIDDEN as above
                continue
            found[(context, name)][sizes[0]] = Path(dirpath) / f
    chosen: dict[tuple[str, str], Path] = {}
    for key, by_size in found.items():
        larger = sorted(s for s in by_size if s >= target)
        best = larger[0] if larger else max(by_size)
        chosen[key] = by_size[best]
    return chosen


def build_icons(spec: SuiteSet) -> Built:
    size = spec.size[0]
    entries: list[tuple[str, str, str, Path]] = []  # class, theme/context, name, path
    versions = {}
    for theme in ICON_THEMES:
        _need(theme.root, theme.package)
        versions[theme.package] = package_version(theme.package)
        for (context, name), path in sorted(scan_icon_theme(theme, size).items()):
            entries.append((icon_class(context, name), f"{theme.name}__{context}", name, path))
    # identical files (theme aliases, symlinks): keep the first; a file under two classes is dropped
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (_, _, _, path) in enumerate(entries):
        by_hash[hashlib.sha1(path.read_bytes()).hexdigest()].append(i)
    unique = []
    for idx in by_hash.values():
        if len({entries[i][0] for i in idx}) == 1:
            unique.append(min(idx))
    entries = [entries[i] for i in sorted(unique)]
    keep = cap_classes([e[0] for e in entries], spec.params["min_class"], spec.params["cap_ratio"])
    items = []
    for i in keep:
        cls, theme, name, path = entries[i]
        items.append(Item(cls, _safe(f"{theme}__{name}"), ("name:" + icon_key(name),),
                          lambda p=path: fit_square(_open_file(p), size), origin=str(path)))
    return Built(items, {"package": ", ".join(t.package for t in ICON_THEMES),
                         "version": versions, "path": [str(t.root) for t in ICON_THEMES]},
                 f"freedesktop icon context folder (one of {', '.join(ICON_CONTEXTS)}); mimetypes split into "
                 f"mimetypes-content (text-*, image-*, audio-*, video-*) and mimetypes-app (the rest); one "
                 f"image per theme and icon name, drawn at {size}px where the theme has it, else scaled from "
                 f"the nearest larger size; classes under {spec.params['min_class']} icons dropped, classes "
                 f"capped at {spec.params['cap_ratio']}x the smallest", grey=False, perceptual_groups=True,
                 excluded=["emotes / emoji / smiley / face folders and icons (FORBIDDEN: reserved for "
                           "independent checks)", "contexts animations, applets, stock, extras",
                           "identical files under two classes"])


def openclipart_class(rel_dir: str) -> str | None:
    """Class of a file in folder ``rel_dir`` (relative to the openclipart root): longest matching prefix."""
    best, label = -1, None
    for prefix, cls in OPENCLIPART_CLASSES.items():
        if (rel_dir == prefix or rel_dir.startswith(prefix + "/")) and len(prefix) > best:
            best, label = len(prefix), cls
    return label


def clipart_base(stem: str, length: int = 16) -> str:
    """Drawing base name, so that the variants of one drawing share a group key: colour words dropped
    (arrow-down-blue / arrow-down-red), trailing numbering (_01, -2, 3), lone letters and separators stripped,
    then cut to ``length`` characters (file names are truncated author credits: ..._benji_pa_01 / _benji_p_01)."""
    tokens = [t for t in re.split(r"[-_. ]+", stem.lower()) if t]
    base = "-".join([t for t in tokens if t not in COLOUR_WORDS] or tokens)
    while True:
        new = re.sub(r"(-*\d+|-+[a-z]|-+)$", "", base)
        if new == base or not new:
            break
        base = new
    return base[:length]


def build_openclipart(spec: SuiteSet) -> Built:
    root = _need(OPENCLIPART_ROOT, "openclipart-png")
    size = spec.size[0]
    entries: list[tuple[str, Path]] = []
    too_large = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        # FORBIDDEN: emoji / smiley / emote / face folders (people/smilies) are reserved for independent checks.
        if is_forbidden(*rel.parts):
            dirnames[:] = []
            continue
        cls = openclipart_class(rel.as_posix())
        if cls is None:
            continue
        for f in sorted(filenames):
            if f.lower().endswith(".png") and not is_forbidden(Path(f).stem):
                if _pixels(Path(dirpath) / f) <= MAX_SOURCE_PIXELS:
                    entries.append((cls, Path(dirpath) / f))
                else:
                    too_large += 1
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, (_, path) in enumerate(entries):
        by_hash[hashlib.sha1(path.read_bytes()).hexdigest()].append(i)
    unique = sorted(min(idx) for idx in by_hash.values() if len({entries[i][0] for i in idx}) == 1)
    entries = [entries[i] for i in unique]
    keep = cap_classes([c for c, _ in entries], spec.params["min_class"], spec.params["cap_ratio"])
    items = []
    for i in keep:
        cls, path = entries[i]
        rel = path.relative_to(root)
        folder_base = f"{rel.parent.as_posix()}/{clipart_base(path.stem)}"
        items.append(Item(cls, _safe(rel.with_suffix("").as_posix().replace("/", "__")), ("base:" + folder_base,),
                          lambda p=path: fit_square(_open_file(p), size, crop=True, margin=max(1, size // 32)),
                          origin=str(path)))
    return Built(items, {"package": "openclipart-png", "version": package_version("openclipart-png"),
                         "path": str(root)},
                 "topic folder of the drawing, by longest matching prefix: " + "; ".join(
                     f"{p} -> {c or 'dropped'}" for p, c in OPENCLIPART_CLASSES.items())
                 + f"; classes under {spec.params['min_class']} drawings dropped, classes capped at "
                   f"{spec.params['cap_ratio']}x the smallest; drawings cropped to their content, longer side "
                   f"scaled to fit {size}px with a margin, transparency on white",
                 grey=False, perceptual_groups=True,
                 excluded=["people/smilies and any emoji / emote / smiley / face folder or file (FORBIDDEN: "
                           "reserved for independent checks)", "folders not in the class table",
                           "identical files under two classes",
                           f"{too_large} drawings over {MAX_SOURCE_PIXELS:,} pixels (or unreadable headers)"])


BUILDERS: dict[str, Callable[[SuiteSet], Built]] = {
    "opencv-digits": build_opencv_digits,
    "uci-digits": build_uci_digits,
    "icons": build_icons,
    "openclipart": build_openclipart,
}


# ------------------------------------------------------------------------------------------ preparation
def recipe(spec: SuiteSet) -> dict[str, Any]:
    """What the prepared files depend on; a manifest with another recipe is rebuilt."""
    versions: dict[str, Any] = {p: package_version(p) for p in spec.packages}
    if spec.name == "uci-digits":
        import sklearn

        versions["scikit-learn"] = sklearn.__version__
    return {"version": RECIPE_VERSION, "seed": SEED, "test_fraction": TEST_FRACTION, "val_seed": VAL_SEED,
            "val_fraction": VAL_FRACTION, "size": list(spec.size),
            "params": spec.params, "packages": versions,
            "forbidden": FORBIDDEN.pattern,
            "classes": OPENCLIPART_CLASSES if spec.name == "openclipart" else None,
            "themes": [t.name for t in ICON_THEMES] if spec.name == "icons" else None}


def _count_pngs(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0


def is_prepared(name: str, root: Path) -> bool:
    """A manifest with the current recipe, and the train/test files (and the validation view's) all there."""
    spec = _spec(name)
    manifest = root / name / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if m.get("recipe") != json.loads(json.dumps(recipe(spec))):
        return False
    view, val = root / f"{name}{VAL_SUFFIX}", m.get("val", {}).get("counts", {})
    if _count_pngs(view / "train") != val.get("train") or _count_pngs(view / "test") != val.get("val"):
        return False
    if spec.native_source:
        return True
    counts = m.get("counts", {})
    return all(_count_pngs(root / name / split) == counts.get(split) for split in ("train", "test"))


def raw_pixel_knn(source: str, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> dict[str, Any]:
    """Raw-pixel kNN (cosine, DINO exp weighting and majority vote) on a prepared set, native size."""
    import torch
    from torchvision.transforms import v2

    from excb.data.datasets import build_dataset
    from excb.evaluation.metrics import evaluate_features, raw_pixel_features

    to_tensor = v2.PILToTensor()
    train = raw_pixel_features(build_dataset(source, split="train", labelled=True, transform=to_tensor))
    test = raw_pixel_features(build_dataset(source, split="test", labelled=True, transform=to_tensor))
    k = min(k, int(train[0].shape[0]))
    with torch.inference_mode():
        out = evaluate_features(*train, *test, k=k, temperature=temperature)
    return {"knn_acc": round(out["knn_acc"], 4), "knn_majority_acc": round(out["knn_majority_acc"], 4),
            "k": k, "temperature": temperature, "metric": "cosine", "features": "raw pixels (uint8, flattened)",
            "num_train": out["num_train"], "num_test": out["num_test"]}


def _write_set(spec: SuiteSet, built: Built, out: Path) -> dict[str, Any]:
    """Render, drop duplicates, split and write PNGs under ``out``; returns the manifest's data part."""
    labels, stems, keys, images, origins = [], [], [], [], []
    seen: dict[str, int] = {}
    conflicted: set[str] = set()
    dropped_blank = 0
    for item in built.items:
        im = item.render()
        if im is None:
            dropped_blank += 1
            continue
        im = im.convert("L" if built.grey else "RGB")
        if im.size != spec.size:
            raise ValueError(f"{item.origin}: rendered {im.size}, expected {spec.size}")
        digest = hashlib.sha1(im.tobytes()).hexdigest()
        if digest in seen:  # identical pixels: one copy; under two classes: neither
            if labels[seen[digest]] != item.label:
                conflicted.add(digest)
            continue
        seen[digest] = len(labels)
        labels.append(item.label)
        stems.append(item.stem)
        keys.append(list(item.keys) + ["px:" + digest])
        images.append(im)
        origins.append(item.origin)
    if built.perceptual_groups:  # near-duplicates within a class (re-exports, small edits) share a group;
        hashes = [dhash(im) for im in images]  # across classes a 64-bit hash is too coarse: it chains drawings
        for cls in sorted(set(labels)):
            idx = [i for i, lab in enumerate(labels) if lab == cls]
            for a, b in near_pairs([hashes[i] for i in idx]):
                keys[idx[a]].append(f"near:{idx[a]}")
                keys[idx[b]].append(f"near:{idx[a]}")
    drop = {seen[d] for d in conflicted}
    keep = [i for i in range(len(labels)) if i not in drop]
    labels = [labels[i] for i in keep]
    stems = [stems[i] for i in keep]
    keys = [keys[i] for i in keep]
    images = [images[i] for i in keep]
    if len(set(stems)) != len(stems):
        raise ValueError(f"{spec.name}: output file names are not unique")
    is_test = grouped_split(labels, keys, SEED, TEST_FRACTION)
    is_val = val_of_train(labels, keys, is_test)
    classes = sorted(set(labels))
    for cls in classes:
        splits = {bool(t) for lab, t in zip(labels, is_test) if lab == cls}
        if splits != {False, True}:
            raise ValueError(f"{spec.name}: class {cls!r} has no {'test' if True not in splits else 'train'} "
                             f"images (too few groups)")
    per_class: dict[str, dict[str, int]] = {c: {"train": 0, "test": 0} for c in classes}
    val_files = []
    for im, lab, stem, test, val in zip(images, labels, stems, is_test, is_val):
        split = "test" if test else "train"
        folder = out / split / _safe(lab)
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{stem}.png", optimize=False)
        per_class[lab][split] += 1
        if val:
            val_files.append(f"train/{_safe(lab)}/{stem}.png")
    (out / VAL_LIST).write_text("".join(f"{f}\n" for f in sorted(val_files)))
    group_sizes = Counter(groups_of(keys))
    return {
        "num_classes": len(classes), "classes": classes,
        "counts": {"train": int((~is_test).sum()), "test": int(is_test.sum())},
        "per_class": per_class,
        "val": _val_manifest(int((~is_test).sum()), len(val_files)),
        "groups": {"count": len(group_sizes), "largest": max(group_sizes.values())},
        "dropped": {"identical_pixels_duplicates": len(built.items) - dropped_blank - len(seen),
                    "identical_pixels_across_classes": len(drop), "blank": dropped_blank},
    }


def prepare(name: str, root: str | Path | None = None, force: bool = False) -> Path:
    """Prepare one suite set under ``root`` (idempotent) and return its folder ``root/name``.

    Folder sets get train/ and test/ class folders and a manifest; Fashion-MNIST (read natively, see
    ``data_source``) gets the manifest only. Both get the validation view ``root/NAME.val`` (write_val_view).
    """
    spec = _spec(name)
    root = Path(root or DEFAULT_ROOT).expanduser()
    final = root / name
    if not force and is_prepared(name, root):
        return final
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict[str, Any] = {"name": name, "description": spec.description, "licence": spec.licence,
                                "image_size": list(spec.size), "mode": "RGB" if spec.colour else "L",
                                "colour": spec.colour, "smoke": spec.smoke}
    if spec.native_source:
        idx_root = _need(FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz", "dataset-fashion-mnist").parent
        from excb.data.datasets import FASHION_MNIST_CLASSES

        manifest.update({
            "source": {"package": "dataset-fashion-mnist", "version": package_version("dataset-fashion-mnist"),
                       "path": str(idx_root), "build_dataset": spec.native_source},
            "num_classes": len(FASHION_MNIST_CLASSES), "classes": list(FASHION_MNIST_CLASSES),
            "counts": {"train": 60000, "test": 10000},
            "labels": "official Fashion-MNIST labels (IDX label files)",
            "split": {"method": "official", "note": "the suite uses the full official split"},
        })
        manifest["raw_pixel_knn"] = raw_pixel_knn(spec.native_source)
        manifest["val"] = _carve_native_val(idx_root, tmp)
    else:
        built = BUILDERS[name](spec)
        manifest["source"] = built.source
        manifest["labels"] = built.labels_from
        manifest.update(_write_set(spec, built, tmp))
        near = f" or 64-bit difference hashes within {NEAR_BITS} bits" if built.perceptual_groups else ""
        manifest["split"] = {"method": "stratified by class, grouped (items sharing a file name base, identical "
                                       f"pixels{near} stay in one split)",
                             "seed": SEED, "test_fraction": TEST_FRACTION}
        manifest["excluded"] = built.excluded
        manifest["raw_pixel_knn"] = raw_pixel_knn(str(tmp))
    acc = manifest["raw_pixel_knn"]["knn_acc"]
    manifest["smoke_by_raw_pixels"] = acc > SMOKE_THRESHOLD
    manifest["recipe"] = recipe(spec)
    manifest["prepare_seconds"] = round(time.perf_counter() - t0, 2)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_val_view(name, root)
    return final


def _carve_native_val(idx_root: Path, out: Path) -> dict[str, Any]:
    """Fashion-MNIST's validation split: training indices chosen as a folder set's are (identical pixels grouped),
    written to ``out/val.txt``."""
    from excb.data.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(idx_root, "train")
    keys = [("px:" + hashlib.sha1(x.tobytes()).hexdigest(),) for x in images]
    is_val = val_of_train([str(int(y)) for y in labels], keys, np.zeros(len(labels), dtype=bool))
    (out / VAL_LIST).write_text("".join(f"{i}\n" for i in np.flatnonzero(is_val)))
    return _val_manifest(len(labels), int(is_val.sum()))


def write_val_view(name: str, root: Path) -> Path:
    """``root/NAME.val``: train/ = the training split without the validation files, test/ = them (hard links to
    the set's own files; Fashion-MNIST's written from its IDX arrays)."""
    spec = _spec(name)
    view = root / f"{name}{VAL_SUFFIX}"
    tmp = root / f".{name}{VAL_SUFFIX}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    listed = (root / name / VAL_LIST).read_text().split()
    if spec.native_source:
        _write_native_val_view(tmp, {int(i) for i in listed})
    else:
        val = set(listed)
        for path in sorted((root / name / "train").glob("*/*.png")):
            rel = path.relative_to(root / name).as_posix()
            dest = tmp / ("test" if rel in val else "train") / path.parent.name / path.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(path, dest)
    if view.exists():
        shutil.rmtree(view)
    tmp.rename(view)
    return view


def _write_native_val_view(out: Path, val: set[int]) -> None:
    from excb.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_MNIST_ROOT, "train")
    for i, (x, y) in enumerate(zip(images, labels)):
        folder = out / ("test" if i in val else "train") / _safe(FASHION_MNIST_CLASSES[int(y)])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x, mode="L").save(folder / f"train{i:05d}.png", optimize=False)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dest)


# ---------------------------------------------------------------------------------------------------- CLI
def _row(name: str, m: dict[str, Any], seconds: float, skipped: bool) -> str:
    knn = m["raw_pixel_knn"]
    size = "x".join(str(s) for s in m["image_size"])
    return (f"| {name} | {m['num_classes']} | {m['counts']['train']} | {m['counts']['test']} | {size} | "
            f"{'colour' if m['colour'] else 'grey'} | {100 * knn['knn_acc']:.1f}% "
            f"({100 * knn['knn_majority_acc']:.1f}% majority) | "
            f"{'yes' if m['smoke'] else 'no'} | "
            f"{'skipped (up to date)' if skipped else f'{seconds:.1f} s'} |")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare the suite's data sets (idempotent)")
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="where the sets go (default %(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME", choices=list(SUITE), help="only these sets")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching manifest exists")
    sub.add_parser("list", help="the suite's data sets")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for s in SUITE.values():
            print(f"{s.name:15s} {s.description}")
        return 0
    root = Path(args.root).expanduser()
    rows = []
    t_all = time.perf_counter()
    failed = 0
    for name in args.only or list(SUITE):
        t0 = time.perf_counter()
        skipped = not args.force and is_prepared(name, root)
        try:
            folder = prepare(name, root, force=args.force)
        except SourceMissing as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        m = json.loads((folder / "manifest.json").read_text())
        rows.append(_row(name, m, time.perf_counter() - t0, skipped))
        print(json.dumps({"set": name, "folder": str(folder), "skipped": skipped,
                          "seconds": round(time.perf_counter() - t0, 2), "num_classes": m["num_classes"],
                          "counts": m["counts"], "raw_pixel_knn": m["raw_pixel_knn"]["knn_acc"]}), flush=True)
    print()
    print("| set | classes | train | test | size | colour | raw-pixel kNN (k=20, cosine, exp T=0.07) | smoke | "
          "time |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nroot {root}; total {time.perf_counter() - t_all:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
    sys.exit(main())
