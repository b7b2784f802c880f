"""kNN (DINO + majority), linear probe, feature extraction and the raw-pixel baseline on real data."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from excb.evaluation.metrics import (
    evaluate,
    extract_features,
    knn_accuracies,
    knn_accuracy,
    linear_probe,
    raw_pixel_features,
)

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _numpy_knn(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, k: int, t: float,
               weighting: str, classes: int) -> float:
    """Brute force, one test point at a time, written independently of the vectorised code."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    hits = 0
    for q, truth in zip(test, yte):
        sims = tr @ (q / np.linalg.norm(q))
        order = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(classes)
        for j in order:
            scores[ytr[j]] += math.exp(sims[j] / t) if weighting == "exp" else 1.0
        best = np.flatnonzero(scores == scores.max())
        if weighting == "majority" and len(best) > 1:
            pred = next(ytr[j] for j in order if ytr[j] in best)  # most similar neighbour among the tied
        else:
            pred = int(np.argmax(scores))
        hits += int(pred == truth)
    return hits / len(yte)


@pytest.mark.parametrize("weighting", ["exp", "majority"])
def test_knn_matches_numpy_brute_force(weighting: str) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 6))
    ytr, yte = rng.integers(0, 4, 150), rng.integers(0, 4, 60)
    train = (centers[ytr] + 1.2 * rng.normal(size=(150, 6))).astype(np.float32)
    test = (centers[yte] + 1.2 * rng.normal(size=(60, 6))).astype(np.float32)
    accs = knn_accuracies(torch.from_numpy(train), torch.from_numpy(ytr), torch.from_numpy(test),
                          torch.from_numpy(yte), ks=(1, 4, 10, 25), temperature=0.1, chunk_size=7)
    for k in (1, 4, 10, 25):
        want = _numpy_knn(train, ytr, test, yte, k, 0.1, weighting, 4)
        assert accs[f"{weighting}_k{k}"] == pytest.approx(want, abs=1e-12), k
        got = knn_accuracy(torch.from_numpy(train), torch.from_numpy(ytr), torch.from_numpy(test),
                           torch.from_numpy(yte), k=k, temperature=0.1, weighting=weighting)
        assert got == accs[f"{weighting}_k{k}"]
    assert 0.3 < accs[f"{weighting}_k10"] < 1.0  # non-trivial data: neither chance nor perfect


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def test_majority_tie_goes_to_most_similar_neighbour_and_exp_differs() -> None:
    # query at angle 0; neighbours by similarity: class 3 (1 deg), class 1 (2, 3 deg), class 3 (4 deg)
    train = torch.tensor([_unit(1), _unit(2), _unit(3), _unit(4), _unit(120)])
    labels = torch.tensor([3, 1, 1, 3, 0])
    query, truth3, truth1 = torch.tensor([_unit(0)]), torch.tensor([3]), torch.tensor([1])
    # 2 votes each for class 1 and 3: the single most similar neighbour (class 3) decides, not the lower id
    assert knn_accuracy(train, labels, query, truth3, k=4, weighting="majority") == 1.0
    assert knn_accuracy(train, labels, query, truth1, k=4, weighting="majority") == 0.0
    # swap which class holds the nearest neighbour: the decision follows it
    swapped = torch.tensor([1, 3, 3, 1, 0])
    assert knn_accuracy(train, swapped, query, truth1, k=4, weighting="majority") == 1.0
    # with 3 neighbours class 1 wins the plain vote, while an almost flat exp weighting agrees ...
    assert knn_accuracy(train, labels, query, truth1, k=3, weighting="majority") == 1.0
    assert knn_accuracy(train, labels, query, truth1, k=3, weighting="exp", temperature=1.0) == 1.0
    # ... and a sharp exp weighting lets the single nearest neighbour outweigh two slightly farther ones
    far = torch.tensor([_unit(1), _unit(40), _unit(41), _unit(90), _unit(120)])
    assert knn_accuracy(far, labels, query, truth3, k=3, weighting="exp", temperature=0.01) == 1.0
    assert knn_accuracy(far, labels, query, truth1, k=3, weighting="majority") == 1.0


def test_knn_rejects_bad_input() -> None:
    x, y = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="k: 11 exceeds"):
        knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="weighting"):
        knn_accuracy(x, y, x, y, k=3, weighting="cosine")
    with pytest.raises(ValueError, match="test_feats: dimension"):
        knn_accuracy(x, y, torch.randn(5, 3), y[:5], k=3)
    with pytest.raises(ValueError, match="train_labels"):
        knn_accuracy(x, y[:9], x, y, k=3)
    with pytest.raises(ValueError, match="num_classes"):
        knn_accuracy(x, y, x, y, k=3, num_classes=2)


def _separable(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 0.5 * torch.randn(n, dim, generator=g) + 10.0, y  # offset: standardisation matters


def test_linear_probe_separable_data() -> None:
    xtr, ytr = _separable(600, 16, 5, seed=0)
    xte, yte = _separable(300, 16, 5, seed=1)
    res = linear_probe(xtr, ytr, xte, yte, epochs=10, lr=0.1, batch_size=64)
    assert res["acc"] >= 0.99 and res["train_acc"] >= 0.99
    assert res["final_train_loss"] < 0.1
    again = linear_probe(xtr, ytr, xte, yte, epochs=10, lr=0.1, batch_size=64)
    assert again["weight_norm"] == res["weight_norm"]  # deterministic given the seed


def test_linear_probe_applies_weight_decay() -> None:
    xtr, ytr = _separable(400, 8, 3, seed=2)
    xte, yte = _separable(100, 8, 3, seed=3)
    plain = linear_probe(xtr, ytr, xte, yte, epochs=8, batch_size=50, weight_decay=0.0)
    decayed = linear_probe(xtr, ytr, xte, yte, epochs=8, batch_size=50, weight_decay=0.05)
    assert decayed["weight_norm"] < 0.8 * plain["weight_norm"]
    assert decayed["final_train_loss"] > plain["final_train_loss"]
    assert decayed["weight_decay"] == 0.05


def test_linear_probe_matches_torch_sgd() -> None:
    """The hand-written update equals nn.Linear + cross_entropy + torch.optim.SGD (momentum, wd on weight)."""
    xtr, ytr = _separable(130, 6, 4, seed=4)
    res = linear_probe(xtr, ytr, xtr[:10], ytr[:10], epochs=3, lr=0.05, batch_size=32, weight_decay=0.01, seed=7)
    x = (xtr - xtr.mean(0)) / xtr.std(0)
    gen = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(6, 4)
    with torch.no_grad():
        head.weight.copy_(torch.randn(4, 6, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD([{"params": [head.weight], "weight_decay": 0.01},
                           {"params": [head.bias], "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    for epoch in range(3):
        for group in opt.param_groups:
            group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * epoch / 3))
        perm = torch.randperm(130, generator=gen)
        for s in range(0, 130, 32):
            idx = perm[s:s + 32]
            opt.zero_grad()
            F.cross_entropy(head(x[idx]), ytr[idx]).backward()
            opt.step()
    assert res["weight_norm"] == pytest.approx(float(head.weight.detach().norm()), rel=1e-5)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items: list) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_extract_features_keeps_order_and_dtype() -> None:
    xs = [torch.full((1, 3, 3), float(i)) for i in range(11)]
    ds = _Pairs([(x, i % 4) for i, x in enumerate(xs)])
    proj = torch.randn(9, 5)
    feats, labels = extract_features(lambda b: (b.flatten(1) @ proj).half(), ds, batch_size=4)
    assert feats.dtype == torch.float32 and feats.shape == (11, 5)
    assert labels.tolist() == [i % 4 for i in range(11)]
    assert torch.allclose(feats, (torch.stack(xs).flatten(1) @ proj).half().float())


def test_raw_pixel_features_accept_pil_and_tensors() -> None:
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    ds = _Pairs([(Image.fromarray(arr), 1), (torch.ones(3, 4), 0)])
    feats, labels = raw_pixel_features(ds)
    assert feats.shape == (2, 12) and labels.tolist() == [1, 0]
    assert feats[0].tolist() == list(range(12))
    with pytest.raises(ValueError, match="one size"):
        raw_pixel_features(_Pairs([(torch.ones(4), 0), (torch.ones(5), 1)]))


def test_evaluate_combines_knn_and_linear() -> None:
    xtr, ytr = _separable(200, 8, 4, seed=5)
    xte, yte = _separable(80, 8, 4, seed=6)
    train_ds = _Pairs(list(zip(xtr, ytr.tolist())))
    test_ds = _Pairs(list(zip(xte, yte.tolist())))
    proj = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    out = evaluate(lambda b: b @ proj, train_ds, test_ds, k=5, linear=True, batch_size=32,
                   linear_kwargs={"epochs": 5})
    assert out["knn_acc"] == knn_accuracy(xtr @ proj, ytr, xte @ proj, yte, k=5)
    assert out["knn_majority_acc"] == knn_accuracy(xtr @ proj, ytr, xte @ proj, yte, k=5, weighting="majority")
    assert out["num_train"] == 200 and out["num_test"] == 80 and out["feature_dim"] == 6
    assert out["linear"]["epochs"] == 5 and out["linear"]["acc"] > 0.9
    assert out["extract_seconds"] >= 0 and out["knn_seconds"] >= 0


def _idx(name: str, header: int, shape: tuple[int, ...]) -> np.ndarray:
    with gzip.open(FASHION / name) as fh:
        return np.frombuffer(fh.read(), np.uint8, offset=header).reshape(shape)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_raw_pixel_knn_on_fashion_mnist_subset() -> None:
    """Real data: raw pixels on 10k train / 2k test land near data.md's full-set 84% (k=20)."""
    xtr = torch.from_numpy(_idx("train-images-idx3-ubyte.gz", 16, (-1, 784))[:10_000].astype(np.float32))
    ytr = torch.from_numpy(_idx("train-labels-idx1-ubyte.gz", 8, (-1,))[:10_000].astype(np.int64))
    xte = torch.from_numpy(_idx("t10k-images-idx3-ubyte.gz", 16, (-1, 784))[:2_000].astype(np.float32))
    yte = torch.from_numpy(_idx("t10k-labels-idx1-ubyte.gz", 8, (-1,))[:2_000].astype(np.int64))
    accs = knn_accuracies(xtr, ytr, xte, yte, ks=(20,))
    assert 0.76 < accs["majority_k20"] < 0.86
    assert 0.76 < accs["exp_k20"] < 0.86


# ----------------------------------------------------------------------------- excb eval (real checkpoint)

def _tiny_run(tmp_path: Path) -> tuple[Path, object]:
    """A run directory holding a real checkpoint of a tiny, randomly initialised teacher."""
    from excb.config import resolve
    from excb.models import build_model
    from excb.training.checkpoint import save_checkpoint

    cfg = resolve(preset_name="cpu-small", overrides=[
        "data=digits", "model.width=8", "num_clusters=32", "model.projector_hidden_dim=32",
        "model.bottleneck_dim=16", "model.predictor_hidden_dim=32", "augment.global_size=16", "seed=3"])
    torch.manual_seed(cfg.seed)
    teacher = build_model(cfg, teacher=True)
    state = {"config": cfg.model_dump(mode="json"), "teacher": teacher.state_dict(), "step": 7}
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", state)
    return tmp_path / "run", teacher


def test_eval_cli_on_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from excb.cli import main
    from excb.data.augment import eval_transform
    from excb.data.datasets import build_dataset

    torch.set_num_threads(1)
    run_dir, teacher = _tiny_run(tmp_path)
    code = main(["eval", str(run_dir), "--data", "digits", "--train-limit", "300", "--test-limit", "120",
                 "--k", "10", "--device", "cpu", "--linear", "--baselines", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 7 and out["num_train"] == 300 and out["num_test"] == 120 and out["k"] == 10
    # the CLI's number is what the library gives for the same teacher and the same eval transform
    tf = eval_transform(16, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_ds = build_dataset("digits", split="train", limit=300, transform=tf, labelled=True)
    test_ds = build_dataset("digits", split="test", limit=120, transform=tf, labelled=True)
    direct = evaluate(teacher.eval().features, train_ds, test_ds, k=10)
    assert out["knn_acc"] == direct["knn_acc"] and out["feature_dim"] == direct["feature_dim"]
    # the checkpoint holds a network initialised with the run's seed: the random-init baseline is that network
    assert out["baselines"]["random_init"]["knn_acc"] == out["knn_acc"]
    raw = out["baselines"]["raw_pixels"]
    assert raw["feature_dim"] == 16 * 16 and raw["knn_acc"] > 0.85  # digits are easy for raw pixels
    assert 0.0 <= out["linear"]["acc"] <= 1.0 and out["linear"]["epochs"] == 100


def _labelled_folder(root: Path, per_class: int = 10) -> Path:
    """A labelled folder (class sub-folders, no train/ or test/) of sklearn digits as PNGs."""
    from excb.data.datasets import load_digits_split

    images, labels = load_digits_split("train")
    counts: dict[int, int] = {}
    for img, y in zip(images, labels):
        if counts.get(int(y), 0) >= per_class:
            continue
        counts[int(y)] = counts.get(int(y), 0) + 1
        (root / f"c{int(y)}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img)).save(root / f"c{int(y)}" / f"{counts[int(y)]}.png")
    return root


def test_eval_on_a_folder_without_split_holds_out_a_disjoint_seeded_test_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Scoring a folder against itself finds each image as its own neighbour (100 % for any network); the
    evaluation holds out 20 % per class instead, the same images every time, and says so."""
    import json

    from excb.cli import main
    from excb.evaluation.splits import holdout_note, labelled_splits

    folder = _labelled_folder(tmp_path / "digits10")
    train_ds, test_ds = labelled_splits(str(folder), None)
    train_paths = {train_ds.path(i) for i in range(len(train_ds))}
    test_paths = [test_ds.path(i) for i in range(len(test_ds))]
    assert len(train_ds) == 80 and len(test_ds) == 20 and not train_paths & set(test_paths)
    assert sorted(int(test_ds.labels[i]) for i in range(20)) == sorted(list(range(10)) * 2)  # stratified
    assert holdout_note(test_ds) == {"of": 100, "fraction": 0.2, "seed": 0, "test": 20}
    assert [labelled_splits(str(folder), None)[1].path(i) for i in range(20)] == test_paths  # seeded

    run_dir, _ = _tiny_run(tmp_path)
    assert main(["eval", str(run_dir), "--data", str(folder), "--k", "5", "--device", "cpu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["num_train"] == 80 and out["num_test"] == 20 and out["holdout"]["test"] == 20
    assert main(["eval", str(run_dir), "--data", str(folder), "--k", "5", "--device", "cpu"]) == 0
    assert "20 of 100 images (20% per class, seed 0) held out as the test split" in capsys.readouterr().out


def test_eval_cli_reports_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from excb.cli import main

    assert main(["eval", str(tmp_path), "--device", "cpu"]) == 2
    assert "no checkpoint found" in capsys.readouterr().err


def test_reference_linear_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--protocol reference`: augmented images through the frozen teacher, raw features, lr 0.3 @ 256, wd 0;
    deterministic for a seed, and named in the output so a figure says which probe made it."""
    import json

    from excb.cli import main
    from excb.evaluation.linear_reference import default_lr, encoder, reference_linear_probe

    torch.set_num_threads(1)
    run_dir, teacher = _tiny_run(tmp_path)
    code = main(["eval", str(run_dir), "--data", "digits", "--train-limit", "200", "--test-limit", "100",
                 "--device", "cpu", "--linear", "--protocol", "reference", "--linear-epochs", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lin = out["linear"]
    assert lin["protocol"] == "reference" and lin["epochs"] == 2 and lin["weight_decay"] == 0.0
    assert lin["lr"] == pytest.approx(0.3) and lin["batch_size"] == 256 and 0.0 <= lin["acc"] <= 1.0
    cfg_args = dict(data="digits", device=torch.device("cpu"), epochs=2, train_limit=200, test_limit=100)
    from excb.training.teacher import load_teacher

    loaded = load_teacher(run_dir, "cpu")
    again = reference_linear_probe(loaded.model, loaded.cfg, **cfg_args)
    assert again["acc"] == lin["acc"]
    assert default_lr(teacher, 1024) == pytest.approx(1.2)
    assert encoder(teacher) is teacher.backbone  # the pooled last stage, as the reference, whatever is served


def test_reference_presets_reproduce_the_released_blur() -> None:
    """The released models saw the reference code's inverted blur: (0, 0.9, 0) for (global 1, global 2, local)."""
    from excb.config import resolve
    from excb.data.augment import effective_blur_probs

    for name in ("resnet50-ep400", "vit-s16-ep800"):
        aug = resolve(preset_name=name).augment
        assert aug.blur_reference_parity is True
        assert effective_blur_probs(aug) == pytest.approx((0.0, 0.9, 0.0))
    assert effective_blur_probs(resolve(preset_name="cpu-small").augment) == pytest.approx((1.0, 0.1, 1.0))
