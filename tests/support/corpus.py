"""Real embedded corpora for the search and curation tests: images written as files, embedded with a real ONNX
bundle (ONNX Runtime, the bundle's eval preprocessing, excb's Assigner) and committed as parts through
``services.corpus.parts`` (the corpus jobs' own writer), so the index and curation read exactly what a job writes.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from excb.inference.assign import Assigner
from excb.inference.onnx_runtime import OrtEmbedder, load_bundle
from services.corpus.parts import part_name, part_table, write_json, write_part

# A short run whose embedding separates digits: the fitted recipe's choices for 8x8 digits a width-8 net can afford
# (as the dashboard test's job A) and PCA whitening, without which the tiny net's embeddings all lie within cosine
# ~0.95 of each other and no near-duplicate threshold tells copies from other digits (measured: 0 false groups at
# 0.95 whitened against one group of every image unwhitened). 150 steps spread the balanced clusters over 31 of 32.
CURATION_STEPS = 150
CURATION = ["model.embedding=multiscale", "model.stem_stride=1", "augment.flip_p=0.0",
            "augment.global_scale_min_start=0.7", "augment.global_scale_min_end=0.6", "augment.local_scale_min=0.3",
            "model.whitening=pca"]


@functools.lru_cache(maxsize=1)
def curation_bundle() -> Path:
    """A bundle of the tiny digits config trained :data:`CURATION_STEPS` steps with :data:`CURATION`."""
    from excb.config import resolve
    from excb.inference.export import export_bundle
    from excb.training.trainer import train
    from support.embed import TINY, workdir

    out = workdir() / "curation"
    overrides = [o for o in TINY if not o.startswith("max_steps=")]
    train(resolve(preset_name="cpu-small", overrides=[*overrides, *CURATION, f"max_steps={CURATION_STEPS}",
                                                      f"out={out / 'run'}"]))
    export_bundle(out / "run", out / "bundle", parity_count=64)
    return out / "bundle"


def digits_folder(root: Path, per_class: Sequence[int], size: int = 32) -> list[tuple[str, int]]:
    """The first ``per_class[c]`` sklearn digits of each class c, as ``root/<c>/<n>.png`` (RGB, ``size`` px);
    returns (absolute path, class) per file. Uneven counts make a long-tailed labelled set."""
    from excb.data.datasets import build_dataset

    ds = build_dataset("digits", split="all", labelled=True)
    taken = [0] * len(per_class)
    out: list[tuple[str, int]] = []
    for i in range(len(ds)):
        image, label = ds[i]
        c = int(label)
        if c >= len(per_class) or taken[c] >= per_class[c]:
            continue
        taken[c] += 1
        path = root / str(c) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(path)
        out.append((str(path), c))
    return out


def noise_images(folder: Path, n: int, bad: int, *, classes: int = 2, shape: tuple[int, int] = (12, 12),
                 suffix: str = ".png", seed: int = 0) -> set[str]:
    """``n`` random-noise images spread over ``classes`` sub-folders plus ``bad`` files named ``broken<i>`` that
    hold bytes no decoder accepts (a JPEG's magic, then nothing); returns every path written."""
    rng = np.random.default_rng(seed)
    paths = set()
    for i in range(n):
        path = folder / f"c{i % classes}" / f"img{i:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
        paths.add(str(path))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(bad):
        path = folder / f"broken{i}{suffix}"
        path.write_bytes(b"\xff\xd8\xff truncated" * (i + 1))
        paths.add(str(path))
    return paths


def planted_copies(files: Sequence[str], folder: Path, count: int, stride: int) -> list[tuple[str, str]]:
    """Byte-for-byte re-encodings of every ``stride``-th file of ``files`` (``count`` of them) in ``folder``: the
    near duplicates a curation test plants; returns (original, copy) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for j in range(count):
        dst = folder / f"copy{j}.png"
        with Image.open(files[j * stride]) as im:
            im.save(dst)
        pairs.append((files[j * stride], str(dst)))
    return pairs


def embed_corpus(bundle_dir: Path, paths: Sequence[str], corpus_dir: Path, *, job_id: str, model_id: str,
                 owner: str | None, chunk: int = 256) -> Path:
    """Embed ``paths`` (absolute image files; one that does not decode becomes an error row) into a corpus."""
    bundle = load_bundle(bundle_dir)
    embedder = OrtEmbedder(bundle, intra_op_threads=1)
    assign = Assigner(bundle.sizes)
    dim = bundle.embed_dim
    chunks = []
    for index, start in enumerate(range(0, len(paths), chunk)):
        names = list(paths[start:start + chunk])
        xs, errors = [], []
        for p in names:
            try:
                with Image.open(p) as im:
                    xs.append(embedder.preprocess(im.convert("RGB")))
                errors.append(None)
            except OSError as exc:
                errors.append(f"undecodable: {exc}")
        emb = np.zeros((len(names), dim), np.float32)
        sims = np.zeros((len(names), bundle.num_clusters), np.float32)
        ok = np.array([e is None for e in errors])
        if xs:
            e, s = embedder.run(np.stack(xs))
            emb[ok], sims[ok] = e, s
        a = assign(emb, sims)
        write_part(corpus_dir, index, part_table(dim, names, a.embeddings, a.cluster, a.balanced_cluster,
                                                 a.similarity, errors))
        chunks.append({"index": index, "part": part_name(index), "items": len(names),
                       "errors": int((~ok).sum()), "status": "done"})
    write_json(corpus_dir / "manifest.json", {
        "job_id": job_id, "model_id": model_id, "owner": owner, "source": str(Path(paths[0]).parent.parent),
        "embed_dim": dim, "num_clusters": bundle.num_clusters, "chunks": chunks, "status": "succeeded",
        "created": time.time()})
    return corpus_dir
