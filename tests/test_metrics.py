"""Recall@K, median and mean rank against a slow, obvious reference and a hand-checked case; and the benchmarks'
paired recall change built on them."""
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from finetune_clip import cache, metrics

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py, outside the package)


def naive_ranks(img, txt, idx):
    """Loops and sorted lists: rank = 1 + candidates scoring strictly higher than the correct one."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    t2i = []
    for c in range(len(txt)):
        scores = [float(np.dot(txt[c], img[i])) for i in range(len(img))]
        t2i.append(1 + sum(s > scores[idx[c]] for s in scores))
    i2t = []
    for i in range(len(img)):
        scores = [float(np.dot(img[i], txt[c])) for c in range(len(txt))]
        own = [c for c in range(len(txt)) if idx[c] == i]
        if not own:
            continue
        best = max(scores[c] for c in own)
        i2t.append(1 + sum(scores[c] > best for c in range(len(txt)) if idx[c] != i))
    return np.array(t2i), np.array(i2t)


def naive_summary(ranks):
    return {**{f"R@{k}": 100.0 * np.mean([r <= k for r in ranks]) for k in (1, 5, 10)},
            "median_rank": float(np.median(ranks)), "mean_rank": float(np.mean(ranks))}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference_with_five_captions_per_image(seed):
    rng = np.random.default_rng(seed)
    n_img, dim = 40, 16
    img = rng.normal(size=(n_img, dim)).astype(np.float32)
    idx = np.repeat(np.arange(n_img), 5)
    txt = (img[idx] + 1.5 * rng.normal(size=(len(idx), dim))).astype(np.float32)  # partly right, partly not
    got = metrics.retrieval_metrics(torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(idx))
    t2i, i2t = naive_ranks(img.astype(np.float64), txt.astype(np.float64), idx)
    for direction, ref in (("text_to_image", t2i), ("image_to_text", i2t)):
        want = naive_summary(ref)
        for key, value in want.items():
            assert got[direction][key] == pytest.approx(value, abs=1e-9), (direction, key)
    assert 0 < got["text_to_image"]["R@1"] < 100  # the case is neither trivial nor hopeless


def test_chunking_does_not_change_ranks():
    torch.manual_seed(5)
    img, idx = torch.randn(30, 8), torch.from_numpy(np.repeat(np.arange(30), 3))
    txt = img[idx] + torch.randn(90, 8)
    a = metrics.ranks(img, txt, idx)
    b = metrics.ranks(img, txt, idx, chunk=7)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_hand_checked_case():
    # 3 images on the axes; captions: two for image 0, one each for images 1 and 2.
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0.0, 0.0],     # caption 0 -> image 0: rank 1
                        [0.0, 1.0, 0.1],     # caption 1 (of image 0) looks like image 1: image 0 scores 0 -> rank 3
                        [0.0, 1.0, 0.0],     # caption 2 -> image 1: rank 1
                        [0.9, 0.0, 0.1]])    # caption 3 (of image 2) looks like image 0 -> rank 2
    idx = torch.tensor([0, 0, 1, 2])
    t2i, i2t = metrics.ranks(img, txt, idx)
    assert t2i.tolist() == [1, 3, 1, 2]
    # image 0: its best caption (0) scores 1.0, nothing else higher -> 1
    # image 1: caption 2 scores 1.0 -> 1; image 2: own caption 3 scores ~0.11, captions 1 (0.0995) below,
    # caption 0 (0) below, caption 2 (0) below -> 1
    assert i2t.tolist() == [1, 1, 1]
    m = metrics.retrieval_metrics(img, txt, idx)
    assert m["text_to_image"]["R@1"] == pytest.approx(50.0)
    assert m["text_to_image"]["median_rank"] == pytest.approx(1.5)
    assert m["text_to_image"]["mean_rank"] == pytest.approx(7 / 4)
    assert m["image_to_text"]["R@1"] == pytest.approx(100.0)


def test_ties_do_not_depend_on_order():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical images
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t2i, _ = metrics.ranks(img, txt, torch.tensor([0, 1]))
    assert t2i.tolist() == [1, 1]


def test_images_without_captions_are_not_counted():
    img, txt = torch.eye(3), torch.eye(3)[:2]
    _, i2t = metrics.ranks(img, txt, torch.tensor([0, 1]))
    assert len(i2t) == 2


def test_mean_recall_and_delta():
    m = {d: {"R@1": 10.0, "R@5": 20.0, "R@10": 30.0} for d in ("text_to_image", "image_to_text")}
    assert metrics.mean_recall(m) == pytest.approx(20.0)
    p = {d: {"R@1": 15.0, "R@5": 20.0, "R@10": 29.0} for d in ("text_to_image", "image_to_text")}
    assert metrics.delta_pp(m, p)["text_to_image"] == {"R@1": 5.0, "R@5": 0.0, "R@10": -1.0}


class _Identity:
    """Heads that pass features through, as bench.paired_change calls them."""

    @staticmethod
    def embed(view):
        return torch.from_numpy(view.image_features), torch.from_numpy(view.text_features)


def _view(img, txt, idx):
    return cache.SplitView(name="all", image_rows=np.arange(len(img)), caption_rows=np.arange(len(txt)),
                           image_features=img, text_features=txt, text_image_index=idx)


def test_the_recall_change_over_galleries_matches_a_naive_one():
    """bench's recall rows with the same heads: a view cut into galleries (a query ranked among its own gallery
    only; a short last gallery left out), changes pooled over every query of every gallery."""
    rng = np.random.default_rng(3)
    n_img, dim, size = 70, 8, 20  # three galleries of 20; the last 10 images left out
    idx = rng.permutation(np.repeat(np.arange(n_img), rng.integers(1, 6, n_img)))  # 1-5 captions, shuffled
    img = rng.normal(size=(n_img, dim)).astype(np.float32)
    txt = (img[idx] + 1.2 * rng.normal(size=(len(idx), dim))).astype(np.float32)
    views = [_view(img, txt, idx), _view(img + 0.4 * rng.normal(size=img.shape).astype(np.float32), txt, idx)]
    cut = [bench.cut_galleries(v, size) for v in views]
    assert [g.n_images for g in cut[0]] == [size] * 3
    changes = {}
    for start in range(0, 3 * size, size):
        mine = np.flatnonzero((idx >= start) & (idx < start + size))
        for direction, col in (("text_to_image", 0), ("image_to_text", 1)):
            before, after = (naive_ranks(v.image_features[start:start + size].astype(np.float64),
                                         txt[mine].astype(np.float64), idx[mine] - start)[col] for v in views)
            for k in (1, 5, 10):
                changes.setdefault((direction, k), []).extend(100.0 * ((after <= k).astype(float)
                                                                       - (before <= k).astype(float)))
    (direction, k), worst = max(changes.items(), key=lambda kv: abs(np.mean(kv[1])))
    got, which = bench.paired_change(_Identity(), list(zip(*cut)))
    mean, _, err, _ = got.split()
    assert which == f"{direction}/R@{k}"
    assert float(mean) == pytest.approx(np.mean(worst), abs=0.006)
    assert float(err) == pytest.approx(2 * np.std(worst, ddof=1) / np.sqrt(len(worst)), abs=0.006)
    assert abs(np.mean(worst)) > 0  # the case has a change to find
