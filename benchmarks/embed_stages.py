"""Per-request cost of each embed-service stage, the old way vs the current way, side by side in one process.

The load benchmark (embed_load.py) measures stages inside running servers; this one isolates them: one real
PNG (the load benchmark's images), one request's worth of work per stage, timed back to back, with the ORT run
at batch 1 on the same thread as the yardstick. "old" is the request path before issue 19 (torchvision eval
transform, torch balancing, ``tolist()`` + ``json``), "new" is what the service runs now. Stages are
interleaved round by round, so a noisy neighbour hits both columns alike.

    python benchmarks/embed_stages.py [--bundle DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def per_call_us(fn: Callable[[], Any], seconds: float) -> float:
    for _ in range(5):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def stages(bundle_dir: Path, png: bytes) -> dict[str, tuple[Callable[[], Any] | None, Callable[[], Any] | None]]:
    """stage -> (old, new); None where a side has no such stage."""
    import orjson
    import torch
    from fastapi.responses import JSONResponse

    from excb.data.augment import eval_transform
    from excb.data.decode import decode_image, header_pixels
    from excb.inference.assign import Assigner
    from excb.inference.eval_pixels import EvalPixels
    from excb.inference.onnx_runtime import OrtEmbedder, balance_paper, l2_normalize, load_bundle, top_k
    from services.embed.inputs import EmbedOptions, EmbedRequest
    from services.embed.monitor import BalanceMonitor
    from services.embed.respond import FastJSONResponse, items

    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    ort = OrtEmbedder(bundle, ["cpu"], intra_op_threads=1)
    inp = bundle.meta["input"]
    old_t = eval_transform(bundle.input_size, inp["mean"], inp["std"])
    new_t = EvalPixels(bundle.input_size, inp["mean"], inp["std"])
    body = json.dumps({"input": base64.b64encode(png).decode(), "top_k": 5}).encode()
    image = decode_image(png)
    x = new_t(image)[None]
    emb, sims = ort.run(x)
    assigner = Assigner(bundle.sizes)
    monitor = BalanceMonitor(bundle.num_clusters, bundle.sizes, 10_000)
    slot = np.empty((1, 3, bundle.input_size, bundle.input_size), np.float32)

    def parse_old() -> Any:
        req = EmbedRequest.model_validate(json.loads(body))
        return EmbedOptions.model_validate(req.model_dump(exclude={"input", "user"})), base64.b64decode(req.input)

    def parse_new() -> Any:
        req = EmbedRequest.model_validate(orjson.loads(body))
        return req, base64.b64decode(req.input)

    def assign_old() -> Any:
        balanced = balance_paper(sims, bundle.sizes)
        raw, bal = sims.argmax(1), balanced.argmax(1)
        monitor.record(bal, raw)
        return l2_normalize(emb), top_k(sims, 5), balanced

    def assign_new() -> Any:
        a = assigner(emb, sims, top_k=5)
        monitor.record(a.balanced_cluster, a.cluster)
        return a

    a = assigner(emb, sims, top_k=5)

    def encode_old() -> bytes:
        vec = l2_normalize(emb)
        data = [{"object": "embedding", "index": 0, "embedding": vec[0].tolist(),
                 "cluster": {"id": int(a.cluster[0]), "similarity": float(a.similarity[0]),
                             "top_k": [{"id": int(c), "similarity": float(v)}
                                       for c, v in zip(a.top_ids[0], a.top_sims[0])]},
                 "balanced_cluster": {"id": int(a.balanced_cluster[0]), "similarity": float(a.balanced_similarity[0]),
                                      "balanced_score": float(a.balanced_score[0])}}]
        return JSONResponse({"object": "list", "data": data}).body

    def encode_new() -> bytes:
        return FastJSONResponse({"object": "list", "data": items(a, "float", True)}).body

    return {
        "parse (JSON + base64)": (parse_old, parse_new),
        "header (pixel budget)": (lambda: header_pixels(png), lambda: header_pixels(png)),
        "decode (PNG)": (lambda: decode_image(png), lambda: decode_image(png)),
        "preprocess": (lambda: old_t(image).numpy(), lambda: new_t(image, out=slot[0])),
        "assign + monitor": (assign_old, assign_new),
        "encode response": (encode_old, encode_new),
        "ORT run, batch 1": (lambda: ort.run(x), lambda: ort.run(x)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=0.3, help="per stage, per side, per round")
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    from embed_load import build_bundle, real_pngs

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_bundle(Path(tmp), 64, 64, 1024)
        size = json.loads((bundle / "model.json").read_text())["input"]["size"]
        png = real_pngs(8, size)[3]
        table = stages(bundle, png)
        times: dict[str, dict[str, list[float]]] = {k: {"old": [], "new": []} for k in table}
        for r in range(args.rounds):
            for name, (old, new) in table.items():
                for side, fn in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
                    if fn is not None:
                        times[name][side].append(per_call_us(fn, args.seconds))
    rows = {k: {s: statistics.median(v) for s, v in sides.items() if v} for k, sides in times.items()}
    print(f"One {len(png)}-byte PNG, {size} px model input; median us per request over {args.rounds} rounds\n")
    print("| stage | old us | new us | old / new |\n|---|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['old']:.0f} | {v['new']:.0f} | {v['old'] / v['new']:.2f}x |")
    around = [k for k in rows if not k.startswith("ORT")]
    old_sum, new_sum = sum(rows[k]["old"] for k in around), sum(rows[k]["new"] for k in around)
    ort_us = rows["ORT run, batch 1"]["new"]
    print(f"| all but ORT | {old_sum:.0f} | {new_sum:.0f} | {old_sum / new_sum:.2f}x |")
    print(f"\nAround the model, per request: old {old_sum / ort_us:.2f}x, new {new_sum / ort_us:.2f}x the ORT run "
          f"at batch 1 ({ort_us:.0f} us)")
    if args.json_out:
        args.json_out.write_text(json.dumps({"rows": rows, "png_bytes": len(png)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
