"""Retrieval metrics with Flickr semantics; pure functions on tensors.

Text->image: each caption has exactly one correct image.
Image->text: an image is a hit at K when any of its captions ranks in the top K.
Ranks are 1-based; a rank counts the candidates scoring strictly higher than the
correct one, so ties are resolved in the query's favour, independent of order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KS = (1, 5, 10)


def _summary(ranks: torch.Tensor, ks=KS) -> dict:
    ranks = ranks.double()
    out = {f"R@{k}": float((ranks <= k).double().mean() * 100) for k in ks}
    out["median_rank"] = float(ranks.quantile(0.5))  # the mean of the middle two on an even count
    out["mean_rank"] = float(ranks.mean())
    return out


def ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image_index: torch.Tensor,
          chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(text->image rank per caption, image->text rank per image that has captions).

    Embeddings need not be normalised. Scores are built ``chunk`` rows at a time,
    so memory stays bounded on any split size.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    idx = text_image_index.long()
    n_img = img.shape[0]
    # Each comparison uses scores from one matmul: recomputing the correct score another
    # way can differ in the last bit and push an item below itself.
    t2i = torch.empty(len(txt), dtype=torch.long)
    for s in range(0, len(txt), chunk):
        sims = txt[s:s + chunk] @ img.T
        correct = sims.gather(1, idx[s:s + chunk, None])
        t2i[s:s + chunk] = (sims > correct).sum(1) + 1
    # Image->text: the image's best-scoring own caption decides; count other images' captions above it.
    i2t = torch.empty(n_img, dtype=torch.long)
    for s in range(0, n_img, chunk):
        sims = img[s:s + chunk] @ txt.T
        own = idx[None, :] == torch.arange(s, s + len(sims))[:, None]
        best = sims.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        i2t[s:s + chunk] = ((sims > best) & ~own).sum(1) + 1
    has_caption = torch.bincount(idx, minlength=n_img) > 0
    return t2i, i2t[has_caption]


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image_index: torch.Tensor,
                      ks=KS) -> dict:
    """Recall@K (percent), median and mean rank in both directions."""
    if len(text_emb) == 0 or len(image_emb) == 0:
        raise ValueError(f"no images ({len(image_emb)}) or captions ({len(text_emb)}) to evaluate")
    t2i, i2t = ranks(image_emb, text_emb, text_image_index)
    return {"text_to_image": _summary(t2i, ks), "image_to_text": _summary(i2t, ks)}


def mean_recall(m: dict) -> float:
    """The single number model selection uses: mean of R@1/5/10 over both directions."""
    return sum(m[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in KS) / (2 * len(KS))


def delta_pp(base: dict, probe: dict, ks=KS) -> dict:
    return {d: {f"R@{k}": round(probe[d][f"R@{k}"] - base[d][f"R@{k}"], 4) for k in ks}
            for d in ("text_to_image", "image_to_text")}
