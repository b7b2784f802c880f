"""``excb data pack FOLDER --out SHARDS``: an image folder (or ``list:FILE``) -> tar shards + ``index.json``.

Every input is first decoded with the same defensive decoder as training (``excb.data.decode``); files
that fail are skipped and counted (reported at the end and stored in the index as ``skipped``).

Stored bytes: a JPEG whose pixels the GPU decoder reads the same way as PIL (baseline/progressive RGB or
grey, no EXIF rotation) is stored byte for byte; everything else (PNG, WebP, CMYK or rotated JPEGs ...) is
re-encoded as an RGB JPEG at quality 95. One format means one decoder on the training side, and nvJPEG
can decode every sample in a batch. Labels come from the first sub-folder (``.cls``; -1 for files directly
under the root), with the class names in the index. ``--out`` may be an fsspec URL.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

from excb.data.decode import DEFAULT_FORMATS, ImageDecodeError, decode_image
from excb.data.shards import ShardWriter, write_index

log = logging.getLogger("excb.data.pack")

JPEG_QUALITY = 95
MAX_BYTES = 200_000_000
MAX_PIXELS = 64_000_000
_ORIENTATION_TAG = 0x0112


@dataclass
class PackResult:
    out: str
    total: int
    skipped: int
    shards: int
    reencoded: int
    classes: tuple[str, ...]


def _keeps_original(data: bytes) -> bool:
    """True when the original JPEG decodes to the same pixels on every decoder we use."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG" or im.mode not in ("RGB", "L"):
            return False
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1) == 1


def encode_sample(path: str, max_pixels: int = MAX_PIXELS) -> tuple[bytes, bool] | str:
    """``(jpeg bytes, re-encoded?)`` for a readable image, else the reason it is skipped."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BYTES + 1)
        image = decode_image(data, max_bytes=MAX_BYTES, max_pixels=max_pixels, allowed_formats=DEFAULT_FORMATS)
        if _keeps_original(data):
            return data, False
    except (OSError, ImageDecodeError) as exc:
        return f"{path}: {exc}"
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), True


def list_inputs(source: str) -> tuple[list[str], list[int], list[str]]:
    """Files, labels and class names of a folder (class = first sub-folder) or a ``list:FILE``."""
    from excb.data.datasets import ImageFileDataset, build_dataset  # lazy: excb/cli.py imports this module

    ds = build_dataset(source, split="all", labelled=False)
    if not isinstance(ds, ImageFileDataset):
        raise ValueError(f"{source!r}: not a folder or list:FILE of image files")
    paths = [ds.path(i) for i in range(len(ds))]
    if source.startswith("list:"):
        return paths, [-1] * len(paths), []
    root = Path(source).expanduser()
    rel = [Path(p).relative_to(root).as_posix() for p in paths]
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[r.split("/", 1)[0]] if "/" in r else -1 for r in rel]
    return paths, labels, classes


def _encoded(paths: Sequence[str], workers: int) -> Iterator[tuple[bytes, bool] | str]:
    if workers <= 1:
        yield from (encode_sample(p) for p in paths)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(encode_sample, paths, chunksize=16)


def pack(source: str, out: str, shard_size: int = 1000, workers: int = 1, progress: bool = True) -> PackResult:
    """Pack ``source`` into shards under ``out``; see the module docstring for what is stored."""
    paths, labels, classes = list_inputs(source)
    writer = ShardWriter(out, shard_size)
    skipped = reencoded = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="excb data pack", unit="img", dynamic_ncols=True)
    try:
        for result, label in zip(_encoded(paths, workers), labels):
            if isinstance(result, str):
                skipped += 1
                log.warning("skipping %s", result)
            else:
                writer.write(result[0], label)
                reencoded += int(result[1])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(skipped=skipped, refresh=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    write_index(out, writer.names, writer.counts, classes, skipped, source)
    return PackResult(out, writer.written, skipped, len(writer.names), reencoded, tuple(classes))


def _run(args: argparse.Namespace) -> int:
    try:
        result = pack(args.folder, args.out, shard_size=args.shard_size, workers=args.workers,
                      progress=not args.no_progress)
    except (OSError, ValueError) as exc:  # missing folder, empty folder, bad --shard-size
        print(f"excb data pack: {exc}", file=sys.stderr)
        return 2
    print(f"packed {result.total} images into {result.shards} shards at {result.out} "
          f"({result.reencoded} re-encoded as JPEG q{JPEG_QUALITY}, {result.skipped} unreadable skipped)")
    return 0 if result.total > 0 else 1


def register_cli(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Adds ``excb data pack``."""
    data = sub.add_parser("data", help="data-set tools (pack an image folder into tar shards)")
    verbs = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    p = verbs.add_parser("pack", help="pack an image folder into WebDataset-style tar shards with an index",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="image folder (class sub-folders become labels) or list:FILE")
    p.add_argument("--out", required=True, help="output folder or fsspec URL for shard-*.tar and index.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--workers", type=int, default=1, help="decode/encode processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    data.set_defaults(func=lambda _args: data.error("choose a DATA_COMMAND: pack"))

