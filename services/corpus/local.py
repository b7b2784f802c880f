"""``excb corpus embed SOURCE --bundle DIR --out DIR``: the same chunks, parts and manifest written on this
machine, in this process, without a control plane (no tenancy: the caller names files it can read).

Re-running with the same ``--out`` resumes: chunks with a completion record are skipped, so an interrupted run
(Ctrl-C, a crash) continues where it stopped and still holds every image exactly once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from services.corpus import claims
from services.corpus.embed import DEFAULT_BATCH_SIZE, embedder_for
from services.corpus.parts import MANIFEST, read_manifest, write_json
from services.corpus.plan import DEFAULT_CHUNK_SIZE, plan_chunks
from services.corpus.runner import embed_chunk


def embed_local(source: str, bundle_dir: str | Path, out: str | Path, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                batch_size: int = DEFAULT_BATCH_SIZE, report: Callable[[dict[str, Any]], None] | None = None
                ) -> dict[str, Any]:
    """Embed ``source`` into the corpus dir ``out``; returns the final manifest."""
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    bundle = str(Path(bundle_dir).expanduser().resolve())
    manifest = read_manifest(root)
    if manifest is None or not manifest.get("chunks"):
        embedder = embedder_for(bundle)
        manifest = {"job_id": None, "model_id": Path(bundle).name, "owner": None, "source": source,
                    "embed_dim": embedder.embed_dim, "num_clusters": embedder.bundle.num_clusters,
                    "model_sha256": embedder.bundle.sha256, "bundle_dir": bundle, "chunk_size": chunk_size,
                    "batch_size": batch_size, "chunks": plan_chunks(source, chunk_size, root), "status": "running",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_json(root / MANIFEST, manifest)
    elif manifest.get("source") != source:
        raise ValueError(f"{root} holds a corpus of {manifest.get('source')!r}, not {source!r}")
    t0, images = time.monotonic(), 0
    total = sum(int(c["items"]) for c in manifest["chunks"])
    for chunk in manifest["chunks"]:
        index = int(chunk["index"])
        if not claims.is_done(root, index):
            record = embed_chunk(root, source, chunk, str(manifest["bundle_dir"]),
                                 int(manifest.get("batch_size") or batch_size), "local", lambda _n: False)
            images += int(record["items"])
        done = claims.done_records(root)
        chunk.update(items=int(done[index]["items"]), errors=int(done[index]["errors"]), status="done")
        if report is not None:
            rate = images / max(time.monotonic() - t0, 1e-6)
            report({"chunks_done": len(done), "chunks_total": len(manifest["chunks"]),
                    "images": sum(int(r["items"]) for r in done.values()), "images_total": total,
                    "errors": sum(int(r["errors"]) for r in done.values()), "images_per_second": rate})
    manifest.update(status="succeeded", images=sum(int(c["items"]) for c in manifest["chunks"]),
                    errors=sum(int(c["errors"]) for c in manifest["chunks"]),
                    updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    write_json(root / MANIFEST, manifest)
    return manifest
