"""Tar shards: packing round-trips every image, streaming sees every sample exactly once per epoch."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from excb.cli import main as cli_main
from excb.data.pack import pack
from excb.data.shards import RawSample, ShardFormatError, ShardStream, open_shards, plan_epoch, read_index, shuffled
from excb.training.checkpoint import load_checkpoint

torch.set_num_threads(1)


def _image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth image (JPEG-friendly) with a unique random tint, so every image is identifiable."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 200, 3)
    return np.clip(base + np.stack([yy * 2, xx * 2, (yy + xx)], -1), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """19 readable images (JPEG, PNG, grey, a rotated JPEG) in two classes plus a root file, 2 broken ones."""
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    originals: dict[str, np.ndarray] = {}
    for cls in ("ants", "bees"):
        (root / cls).mkdir()
        for i in range(9):
            a = _image(rng, 24 + i, 30 - i)
            name = f"{cls}/{i:02d}.{'png' if i % 3 == 0 else 'jpg'}"
            Image.fromarray(a).save(root / name, quality=90)
            originals[name] = a
    grey = _image(rng, 20, 20)[..., 0]
    Image.fromarray(grey, mode="L").save(root / "grey.jpg")
    originals["grey.jpg"] = np.repeat(grey[..., None], 3, -1)
    (root / "ants" / "truncated.jpg").write_bytes((root / "ants" / "01.jpg").read_bytes()[:60])
    (root / "bees" / "notanimage.png").write_bytes(b"hello")
    return root, originals


@pytest.fixture(scope="module")
def shards(folder: tuple[Path, dict[str, np.ndarray]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    result = pack(str(folder[0]), str(out), shard_size=4, progress=False)
    assert (result.total, result.skipped, result.shards) == (19, 2, 5)
    return out


def _decoded_members(out: Path) -> list[tuple[str, bytes, int]]:
    items = []
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".jpg"):
                    key = name[:-4]
                    assert f"{key}.cls" in names
                    items.append((key, tar.extractfile(name).read(), int(tar.extractfile(f"{key}.cls").read())))
    return items


def test_pack_round_trips_every_image(folder, shards: Path) -> None:
    root, originals = folder
    index = json.loads((shards / "index.json").read_text())
    assert index["total"] == 19 and index["skipped"] == 2 and index["classes"] == ["ants", "bees"]
    assert [s["count"] for s in index["shards"]] == [4, 4, 4, 4, 3]
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(5)]
    members = _decoded_members(shards)
    assert [k for k, _, _ in members] == [f"{i:06d}" for i in range(19)]  # keys = global sample ids
    # The packer walks the folder in sorted order, skipping the broken files.
    names = sorted(originals)
    assert len(members) == len(names)
    for name, (_, data, label) in zip(names, members):
        assert label == (["ants", "bees"].index(name.split("/")[0]) if "/" in name else -1)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        if name.endswith(".jpg"):  # original JPEG bytes kept: identical to the source file
            assert data == (root / name).read_bytes()
        else:  # PNG re-encoded as JPEG q95: same pixels up to JPEG error
            assert Image.open(io.BytesIO(data)).format == "JPEG"
            assert np.abs(decoded - originals[name]).mean() < 3.0, name
        assert decoded.shape == originals[name].shape


def test_rotated_jpeg_is_reencoded_upright(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    a = _image(np.random.default_rng(1), 10, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(a).save(src / "r.jpg", exif=exif, quality=95)
    result = pack(str(src), str(tmp_path / "out"), progress=False)
    assert result.reencoded == 1
    (_, data, _), = _decoded_members(tmp_path / "out")
    assert Image.open(io.BytesIO(data)).size == (10, 30)  # width, height after the EXIF rotation


@pytest.mark.parametrize("counts", [[4, 4, 4, 4, 3], [1, 0, 7, 2], [100], [3, 5, 2, 9, 1, 6, 4, 8]])
@pytest.mark.parametrize("world,workers,block", [(1, 1, 1), (2, 2, 1), (3, 2, 1), (2, 3, 2), (4, 1, 3)])
def test_plan_covers_every_sample_exactly_once(counts: list[int], world: int, workers: int, block: int) -> None:
    total = sum(counts)
    orders = []
    for epoch in range(3):
        seen: Counter = Counter()
        per_rank = []
        for rank in range(world):
            n = 0
            for worker in range(workers):
                for shard, start, stop in plan_epoch(counts, epoch, 7, rank, world, worker, workers, block):
                    assert 0 <= start < stop <= counts[shard]
                    seen.update((shard, i) for i in range(start, stop))
                    n += stop - start
            per_rank.append(n)
        assert sum(seen.values()) == total and all(v == 1 for v in seen.values())
        assert max(per_rank) - min(per_rank) <= 1  # ranks balanced
        orders.append([s for s, _, _ in plan_epoch(counts, epoch, 7, 0, 1, 0, 1)])
    if len([c for c in counts if c]) > 3:
        assert len({tuple(o) for o in orders}) > 1  # shard order changes between epochs


def test_shuffle_buffer_is_a_permutation() -> None:
    import random

    out = list(shuffled(iter(range(100)), 10, random.Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert list(shuffled(iter(range(5)), 1, random.Random(0))) == list(range(5))


def _keys(batch: list[RawSample]) -> list[int]:
    return [s.key for s in batch]


def test_two_ranks_two_workers_see_every_sample_once_per_epoch(shards: Path) -> None:
    """Real DataLoader worker processes: the (rank, worker) split comes from get_worker_info()."""
    for epoch in (0, 1):
        seen: list[int] = []
        for rank in range(2):
            stream = ShardStream(str(shards), mode="raw", seed=3, rank=rank, world_size=2, shuffle_buffer=4)
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork")
            seen += [s.key for s in loader]
        assert sorted(seen) == list(range(19)), epoch


def test_batches_are_equal_per_rank_and_items_decode(shards: Path) -> None:
    """Batched mode: each rank gets (N // world) // batch full batches; items match the map-style format."""
    for rank in range(2):
        stream = ShardStream(str(shards), mode="raw", rank=rank, world_size=2, batch_size=3, collate=_keys,
                             shuffle_buffer=8)
        batches = list(DataLoader(stream, batch_size=None, num_workers=2, multiprocessing_context="fork"))
        full = [b for b in batches if len(b) == 3]
        assert len(full) >= (19 // 2) // 3
        assert [len(b) for b in batches].count(3) == len(batches) - (1 if len(batches[-1]) < 3 else 0)
    stream = ShardStream(str(shards), transform=lambda im: np.asarray(im).shape, labelled=True, shuffle_buffer=1)
    items = list(stream)
    assert len(items) == 19 and all(shape[2] == 3 for shape, _ in items)
    assert sorted({label for _, label in items}) == [-1, 0, 1]


def test_augmentation_draws_do_not_depend_on_workers(shards: Path) -> None:
    def draw(_image: Image.Image) -> float:
        return float(torch.rand(1))

    values = []
    for workers in (0, 2):
        stream = ShardStream(str(shards), transform=draw, seed=5, shuffle_buffer=1)
        stream.set_epoch(2)
        ctx = "fork" if workers else None
        values.append(sorted(DataLoader(stream, batch_size=None, num_workers=workers, multiprocessing_context=ctx)))
    assert values[0] == values[1] and len(set(values[0])) == 19


def test_fsspec_url_and_limit(shards: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in shards.iterdir():
        fs.pipe(f"/excb-test/{path.name}", path.read_bytes())
    stream = open_shards("shards:memory://excb-test", mode="raw", shuffle_buffer=1)
    assert len(stream) == 19 and sorted(s.key for s in stream) == list(range(19))
    limited = open_shards("shards:memory://excb-test/index.json", mode="raw", limit=6, shuffle_buffer=1)
    assert len(limited) == 6 and sorted(s.key for s in limited) == list(range(6))


def test_pack_to_url_and_cli(folder, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["data", "pack", str(folder[0]), "--out", "memory://packed", "--shard-size", "10",
                     "--no-progress"]) == 0
    assert "packed 19 images into 2 shards" in capsys.readouterr().out
    assert read_index("memory://packed").counts == (10, 9)
    assert cli_main(["data", "pack", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_index_disagreeing_with_shards_is_a_clear_error(shards: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for path in shards.iterdir():
        (bad / path.name).write_bytes(path.read_bytes())
    doc = json.loads((bad / "index.json").read_text())
    doc["shards"][0]["count"] = 6
    (bad / "index.json").write_text(json.dumps(doc))
    with pytest.raises(ShardFormatError, match="has 4 samples"):
        list(ShardStream(str(bad), mode="raw", shuffle_buffer=1))
    with pytest.raises(FileNotFoundError, match="excb data pack"):
        read_index(str(tmp_path / "nowhere"))
    (bad / "index.json").write_text("{}")
    with pytest.raises(ShardFormatError):
        read_index(str(bad))


# ------------------------------------------------------------------------------------- trainer integration
TINY = [
    "batch_size=8", "model.width=8", "model.num_clusters=16", "model.projector_hidden_dim=32",
    "model.bottleneck_dim=16", "model.predictor_hidden_dim=32", "augment.global_size=16", "augment.local_size=8",
    "augment.num_local_crops=2", "kmeans.samples=16", "kmeans.iterations=3", "progress=false",
    "data.num_workers=0", "histogram_every_steps=2", "checkpoint_every_steps=100", "epochs=2",
]


def _train(out: Path, *extra: str) -> dict:
    from excb.config import resolve
    from excb.training.trainer import train

    cfg = resolve(preset_name="cpu-small", overrides=[*TINY, f"out={out}", *extra])
    result = train(cfg)
    return json.loads((result.run_dir / "summary.json").read_text())


@pytest.mark.parametrize("gpu_augment", ["off", "on"])
def test_trainer_streams_shards(shards: Path, tmp_path: Path, gpu_augment: str) -> None:
    """19 samples, batch 8: 2 steps per epoch, 2 epochs; 'on' runs the GPU decode + multi-crop on CPU tensors."""
    summary = _train(tmp_path / "r", f"data=shards:{shards}", f"data.gpu_augment={gpu_augment}",
                     "data.shuffle_buffer=4")
    assert summary["status"] == "completed" and summary["steps"] == 4 and summary["epochs"] == 2
    assert summary["images_seen"] == 32 and summary["skipped_files"] == 0
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if r.get("type") == "step")


def test_trainer_gpu_path_on_a_map_style_set_resumes_exactly(tmp_path: Path) -> None:
    """digits through ToUint8Tensor + GpuMultiCrop: draws are a function of (seed, rank, epoch, batch)."""
    base = ["data=digits", "data.limit=40", "data.gpu_augment=on", "kmeans.enabled=false"]
    from excb.config import resolve
    from excb.training.trainer import TrainingInterrupted, train

    full = _train(tmp_path / "a", *base, "max_steps=4")
    calls = {"n": 0}

    def stop_at_2() -> bool:
        calls["n"] += 1
        return calls["n"] == 2

    with pytest.raises(TrainingInterrupted):
        train(resolve(preset_name="cpu-small", overrides=[*TINY, f"out={tmp_path / 'b'}", *base, "max_steps=4"]),
              should_stop=stop_at_2)
    resumed = _train(tmp_path / "b", *base, "max_steps=4")
    assert full["steps"] == resumed["steps"] == 4
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["student"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["student"]
    assert all(torch.equal(a[k], b[k]) for k in a)
