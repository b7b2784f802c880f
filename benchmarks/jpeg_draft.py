"""JPEG draft decoding for inference: full decode vs a DCT-scaled decode, side by side in one process.

Two questions, answered separately:

* speed: decode + preprocess of one camera-sized JPEG, full vs drafted to ``DRAFT_MARGIN`` x the model's input
  size, for the input sizes the product serves (28-32 px on CPU, 224 px on GPU). The photo is generated (smooth
  shapes plus sensor-like noise, saved at quality 90), so the benchmark needs no data; decode time depends on
  the size and the entropy of the file, not on what it shows. Rounds interleave the two ways.
* fidelity: the served embedding of real photos (``--photos``, every JPEG with a short side >= 128 px) through
  each ``--bundle`` (ONNX Runtime, the service's preprocess), full decode vs drafted at 2x, 4x and 8x the input
  size: cosine to the full decode and top-1 cluster agreement.

    python benchmarks/jpeg_draft.py [--bundle DIR ...] [--photos DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_PHOTOS = "/usr/share/doc/opencv-doc/examples"  # Debian's opencv-doc: real photographs, offline


def camera_jpeg(width: int = 4000, height: int = 3000, seed: int = 0) -> bytes:
    """A photo-sized JPEG with photo-like entropy: large smooth shapes plus per-pixel noise, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 90 * np.sin(xx / (97 + 40 * c) + yy / (131 - 30 * c) + c) for c in range(3)], axis=-1)
    noisy = base + rng.normal(0, 12, size=base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def speed(data: bytes, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    """Median ms per image of decode + preprocess, full vs drafted, per input size."""
    import torch

    from excb.data.decode import decode_image
    from excb.inference.eval_pixels import EvalPixels
    from excb.inference.onnx_runtime import DRAFT_MARGIN

    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        prep = EvalPixels(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        ways = {"full": 0, "draft": DRAFT_MARGIN * size}
        times: dict[str, list[float]] = {k: [] for k in ways}
        decoded = {k: decode_image(data, min_side=m).size for k, m in ways.items()}
        for _ in range(rounds):
            for way, min_side in ways.items():
                t0 = time.perf_counter()
                prep(decode_image(data, min_side=min_side))
                times[way].append((time.perf_counter() - t0) * 1e3)
        full, draft = statistics.median(times["full"]), statistics.median(times["draft"])
        rows.append({"input_size": size, "decoded_full": decoded["full"], "decoded_draft": decoded["draft"],
                     "full_ms": round(full, 1), "draft_ms": round(draft, 1), "speedup": round(full / draft, 2)})
    return rows


def fidelity(bundle_dir: Path, photos: list[Path], margins: list[int]) -> dict[str, Any]:
    """Cosine of the served embedding to the full decode's, and top-1 cluster agreement, per margin."""
    from excb.data.decode import decode_image
    from excb.inference.onnx_runtime import OrtEmbedder, l2_normalize, load_bundle

    embedder = OrtEmbedder(load_bundle(bundle_dir), ["cpu"])
    size = embedder.bundle.input_size
    blobs = [p.read_bytes() for p in photos]

    def served(min_side: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([embedder.preprocess(decode_image(b, min_side=min_side)) for b in blobs])
        emb, sims = embedder.run(x)
        return l2_normalize(emb), sims.argmax(1)

    full_emb, full_top = served(0)
    row: dict[str, Any] = {"bundle": str(bundle_dir), "input_size": size, "photos": len(blobs)}
    for m in margins:
        emb, top = served(m * size)
        cos = (emb * full_emb).sum(1)
        row[f"{m}x"] = {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 4),
                        "top1_cluster_agreement": round(float((top == full_top).mean()), 3)}
    return row


def real_photos(root: Path, min_short_side: int = 128) -> list[Path]:
    from PIL import Image

    found = []
    for p in sorted(root.rglob("*.jp*g")):
        try:
            with Image.open(p) as im:
                if im.format == "JPEG" and min(im.size) >= min_short_side:
                    found.append(p)
        except OSError:
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", nargs="*", default=[], help="exported bundles for the fidelity check")
    p.add_argument("--photos", default=DEFAULT_PHOTOS, help="a folder of real JPEG photos")
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224], help="model input sizes for the speed check")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, default=4000)
    p.add_argument("--height", type=int, default=3000)
    args = p.parse_args(argv)
    data = camera_jpeg(args.width, args.height)
    out: dict[str, Any] = {"photo": {"size": [args.width, args.height], "bytes": len(data)},
                           "speed": speed(data, args.sizes, args.rounds), "fidelity": []}
    photos = real_photos(Path(args.photos)) if Path(args.photos).is_dir() else []
    if args.bundle and not photos:
        print(f"no JPEG photos under {args.photos}: fidelity skipped", file=sys.stderr)
    for bundle in args.bundle if photos else []:
        out["fidelity"].append(fidelity(Path(bundle), photos, [2, 4, 8]))
    lines = [f"decode + preprocess of one {args.width}x{args.height} JPEG ({len(data) / 1e6:.1f} MB), 1 thread:",
             "", "| input px | decoded full -> draft | full ms | draft ms | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['input_size']} | {r['decoded_full'][0]}x{r['decoded_full'][1]} -> "
              f"{r['decoded_draft'][0]}x{r['decoded_draft'][1]} | {r['full_ms']} | {r['draft_ms']} | "
              f"{r['speedup']}x |" for r in out["speed"]]
    if out["fidelity"]:
        lines += ["", "served embedding, drafted vs full decode (mean / min cosine, top-1 cluster agreement):", "",
                  "| bundle | input px | photos | 2x | 4x (served) | 8x |", "|---|---|---|---|---|---|"]
        for r in out["fidelity"]:
            cells = [f"{r[m]['mean_cosine']:.4f} / {r[m]['min_cosine']:.3f} / "
                     f"{100 * r[m]['top1_cluster_agreement']:.0f}%" for m in ("2x", "4x", "8x")]
            lines.append(f"| {Path(r['bundle']).name} | {r['input_size']} | {r['photos']} | "
                         + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
