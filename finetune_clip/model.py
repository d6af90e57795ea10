"""Building and loading CLIP models, taking their heads out, and the pre-projection trunk forwards.

A model is an open_clip name (``ViT-B-32``) or an open_clip model-config JSON file (registered
through ``open_clip.add_model_config``, so open_clip builds it exactly as it builds its own).
Weights are an open_clip tag (``openai``), a local FILE (state dict or OpenAI TorchScript), or
``none`` (seeded random init). The projection heads are taken out of the model, so open_clip's
own towers return the pre-projection features the cache stores; features times heads equal
``encode_image`` / ``encode_text`` (tests prove it).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import socket
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from . import PRETRAINED


class ModelError(RuntimeError):
    """A model or its weights cannot be built or loaded; the message says what was expected."""


@dataclass
class LoadedModel:
    model: torch.nn.Module       # the whole CLIP model, heads still in place
    preprocess: object           # open_clip's eval transform (PIL -> tensor)
    tokenizer: object
    arch: str                    # the open_clip model name that rebuilds this architecture
    pretrained: str              # 'none', a tag, or 'file:<abs path>'
    description: str             # what the user is told was loaded
    config: str = ""             # the model-config JSON when the model came from a config file, else ''


# ---------------------------------------------------------------- architectures

def register_config(path: str | os.PathLike) -> tuple[str, str]:
    """Register an open_clip model-config JSON file; return (model name, canonical config JSON).

    open_clip names a registered config by its file stem. A stem that already names
    another architecture is refused rather than silently shadowing it.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model config {path} is not readable JSON ({str(exc).splitlines()[0][:120]})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ModelError(f"{path} is not an open_clip model config: missing {missing} "
                         "(expected keys embed_dim, vision_cfg, text_cfg)")
    name = path.stem
    known = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if known is not None and known != cfg:
        raise ModelError(f"model config {path} is named {name!r}, which open_clip already knows as another "
                         "architecture; rename the file")
    if known is None:
        open_clip.add_model_config(path)
    return name, json.dumps(cfg, sort_keys=True)


def register_recorded_config(name: str, config: str) -> None:
    """Register a config recorded in a cache or checkpoint, so the model is rebuilt exactly."""
    if name in open_clip.list_models() and open_clip.get_model_config(name) == json.loads(config):
        return
    folder = Path(tempfile.mkdtemp(prefix="clip-config-"))
    (folder / f"{name}.json").write_text(config, encoding="utf-8")
    register_config(folder / f"{name}.json")


def resolve_arch(model: str) -> tuple[str, str]:
    """(open_clip model name, config JSON or '') for a --model value: a known name or a config file."""
    if model.endswith(".json") or (os.sep in model and not model.startswith(("hf-hub:", "local-dir:"))):
        if not Path(model).is_file():
            raise ModelError(f"model config not found: {model} (expected an open_clip model-config JSON file)")
        return register_config(model)
    if model not in open_clip.list_models():
        raise ModelError(f"unknown model {model!r}: neither an open_clip model name (e.g. ViT-B-32, "
                         "ViT-B-32-quickgelu) nor a model-config JSON file")
    return model, ""


# ---------------------------------------------------------------- weights

def _is_torchscript(path: Path) -> bool:
    """OpenAI's own .pt files are TorchScript archives; open_clip's state-dict loader refuses them."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_tag(name: str, tag: str):
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ModelError(f"unknown pretrained tag {tag!r} for {name}; known tags: "
                         f"{open_clip.list_pretrained_tags_by_model(name)}; or pass a local FILE or 'none'")
    if not _hub_reachable():
        # No network: let huggingface_hub serve its local cache without ~1 min of retries.
        import huggingface_hub.constants as hf_constants
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_constants.HF_HUB_OFFLINE = True
    # OpenAI's weights were trained with QuickGELU; the plain 'ViT-B-32' config uses GELU.
    quick = bool(cfg.get("quick_gelu")) and not name.endswith("-quickgelu")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, force_quick_gelu=quick)
    except RuntimeError as exc:
        raise ModelError(f"could not get the {tag!r} weights for {name} ({str(exc).splitlines()[0][:160]}); "
                         "offline, pass --pretrained FILE (a local checkpoint) or --pretrained none") from None
    arch = name + "-quickgelu" if quick else name
    return model, preprocess, arch


def _load_file(name: str, path: Path):
    if _is_torchscript(path):
        # The way open_clip loads OpenAI's archives: rebuild from the state dict, with QuickGELU.
        model = open_clip.load_openai_model(str(path), precision="fp32", device="cpu")
        _check_same_architecture(model, name, path)
        preprocess = open_clip.image_transform(model.visual.image_size, is_train=False,
                                               mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
        arch = name if name.endswith("-quickgelu") else name + "-quickgelu"
        return model, preprocess, arch
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    except (RuntimeError, KeyError, ValueError, OSError, EOFError) as exc:
        raise ModelError(f"cannot load {path} into {name}: {str(exc).splitlines()[0][:200]}; "
                         "expected a state dict of that architecture (pass the matching --model)") from None
    return model, preprocess, name


def _check_same_architecture(model: torch.nn.Module, name: str, path: Path) -> None:
    with _quiet():
        ref = open_clip.create_model(name, pretrained=None)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if want != got:
        diff = sorted(set(want.items()) ^ set(got.items()))[:2]
        raise ModelError(f"{path} is not a {name} checkpoint (first differences: {diff}); pass the matching --model")


@contextmanager
def _quiet():
    """open_clip logs a warning for every random init; the caller says what was loaded instead."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16] if text else ""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_model(model: str = "ViT-B-32", pretrained: str = "openai", seed: int = 0) -> LoadedModel:
    """``model``: an open_clip name or config JSON file; ``pretrained``: a tag, a local FILE, or 'none'."""
    name, config = resolve_arch(model)
    if pretrained == "none":
        torch.manual_seed(seed)
        with _quiet():
            net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        arch, tag, desc = name, "none", f"{name}, random init (seed {seed}): features carry no pretrained knowledge"
    elif Path(pretrained).is_file():
        path = Path(pretrained).resolve()
        net, preprocess, arch = _load_file(name, path)
        tag, desc = f"file:{path}", f"{arch} from {path}"
    elif os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ModelError(f"pretrained file not found: {pretrained}")
    else:
        net, preprocess, arch = _load_tag(name, pretrained)
        tag, desc = pretrained, f"{arch}, pretrained={pretrained}"
    net.eval().requires_grad_(False)
    return LoadedModel(net, preprocess, open_clip.get_tokenizer(name), arch, tag, desc, config)


def load_like_cache(info: dict) -> LoadedModel:
    """Rebuild the model a cache was made with, from its recorded model, config, pretrained and seed."""
    if info.get("model_config"):
        register_recorded_config(str(info["model"]), str(info["model_config"]))
    pretrained = str(info["pretrained"])
    if pretrained.startswith("file:"):
        pretrained = _recorded_file(Path(pretrained[5:]), str(info.get("pretrained_sha256") or ""))
    loaded = load_model(str(info["model"]), pretrained, seed=max(int(info.get("seed") or 0), 0))
    if loaded.arch != info["model"]:
        raise ModelError(f"rebuilt {loaded.arch}, but the cache was made with {info['model']}")
    return loaded


def _recorded_file(path: Path, sha256: str) -> str:
    """The weights file a cache recorded; where it is gone, the file of the same name and checksum that ships with
    this package (ShapesCLIP lay outside the package in earlier versions)."""
    if path.is_file():
        return str(path)
    shipped = PRETRAINED / path.name
    if sha256 and shipped.is_file() and file_sha256(shipped) == sha256:
        return str(shipped)
    raise ModelError(f"the weights this cache was made with are no longer at {path}; put them back there to rebuild "
                     "its model (probe, eval and compare need only the cache)")


# ---------------------------------------------------------------- heads and trunks

def take_heads(model: torch.nn.Module) -> dict:
    """Copy the heads out (fp32 numpy) and remove them, so the towers return pre-projection features."""
    heads = {"visual_proj": model.visual.proj.detach().float().cpu().numpy().copy(),
             "text_projection": model.text_projection.detach().float().cpu().numpy().copy(),
             "logit_scale": np.float32(model.logit_scale.detach().float().cpu().item())}
    model.visual.proj = None
    model.text_projection = None
    return heads


@torch.no_grad()
def image_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """ln_post output at the class token (the model's heads must have been taken out).

    open_clip's ViT runs its last block at every patch and then keeps the class token; here that block
    runs at the class token alone (see last_block_at), wherever the trunk is open_clip's own modules.
    """
    v = model.visual
    assert v.proj is None, "take_heads(model) first"
    conv1 = getattr(v, "conv1", None)  # an ONNX Runtime trunk has none: it takes fp32
    pixels = pixels.to(conv1.weight.dtype if conv1 is not None else torch.float32)
    if not (isinstance(v, open_clip.transformer.VisionTransformer) and pools_class_token(v) and hasattr(v, "_embeds")
            and _rows_only(v.transformer)):
        return v(pixels).float()
    x = last_block_at(v.transformer, v._embeds(pixels), torch.zeros(len(pixels), dtype=torch.long))
    return v._pool(x.unsqueeze(1))[0].float()  # ln_post at the class token, before or after pooling alike


def pools_class_token(visual: torch.nn.Module) -> bool:
    """Whether the image trunk's output is its class token alone (no attention pooling), so that its last block
    need run nowhere else."""
    return getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """ln_final output at the EOT token, running only as many positions as the longest caption needs.

    Exact, not approximate: the causal mask means position i attends to positions
    <= i only, so the padding after a caption's EOT never reaches the EOT's
    features. Trimming the context to the batch's longest caption (and slicing the
    positional embedding and mask to match) just skips work on padding.
    Runs with autograd when it is enabled (pretraining uses it); extraction wraps it in no_grad.
    """
    eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
    n = int(eot.max()) + 1
    cast = model.token_embedding.weight.dtype  # the trunk's dtype (quantized layers have no float weight)
    x = model.token_embedding(tokens[:, :n]).to(cast) + model.positional_embedding[:n].to(cast)
    if _rows_only(model.transformer):  # the last block at the EOT alone, attending to the positions up to it
        after = torch.arange(n, device=tokens.device) > eot[:, None].to(tokens.device)
        x = last_block_at(model.transformer, x, eot, model.attn_mask[:n, :n], after)
        return model.ln_final(x).float()
    if getattr(model.transformer, "takes_at", False):  # int8-ort's exported trunk does the same in its graph
        return model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n], at=eot)).float()
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    return x[torch.arange(x.shape[0]), eot].float()


def _rows_only(transformer: torch.nn.Module) -> bool:
    """Whether last_block_at can run ``transformer``: open_clip's own batch-first blocks (not a compiled or an
    ONNX Runtime trunk, whose forward is its own), attention as MultiheadAttention or LinearSelfAttention."""
    blocks = getattr(transformer, "resblocks", None)
    return (isinstance(transformer, open_clip.transformer.Transformer) and transformer.batch_first
            and len(blocks) > 0 and not getattr(transformer, "grad_checkpointing", False)
            and all(type(b) is open_clip.transformer.ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                    and isinstance(b.attn, (torch.nn.MultiheadAttention, LinearSelfAttention)) for b in blocks))


def last_block_at(transformer: torch.nn.Module, x: torch.Tensor, at: torch.Tensor, attn_mask=None,
                  padding=None) -> torch.Tensor:
    """The transformer's output at one position per sequence (``at``), its last block computed there alone.

    Every block but the last runs at every position, as open_clip runs them; the last needs every position's
    keys and values, but its queries, attention output, MLP and residuals only at ``at``: the output at a
    position depends on the others only through their keys and values. The same arithmetic at that position
    (the difference from the whole forward is float rounding; tests compare with open_clip's encode_*), for
    five-sixths of one block less work (keys and values are still computed everywhere): 6.5% of ViT-B/32's
    FLOPs on either trunk. ``padding`` (batch x positions, True where a position comes after ``at``) is what
    the causal mask says for that one query.
    """
    *first, last = transformer.resblocks
    for block in first:
        x = block(x, attn_mask=attn_mask)
    rows = torch.arange(x.shape[0], device=x.device)
    at = at.to(x.device)
    y = last.ln_1(x)
    query = y[rows, at].unsqueeze(1)
    h = x[rows, at].unsqueeze(1) + last.ls_1(last.attn(query, y, y, need_weights=False, key_padding_mask=padding)[0])
    h = h + last.ls_2(last.mlp(last.ln_2(h)))
    return h[:, 0]


def encode_window(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Text features of a window of captions: sorted by length, encoded in batches of similar length.

    Small batches keep each batch's lengths close, so little of the work is padding (text_features runs each batch
    only as far as its longest caption).
    """
    order = torch.argsort(tokens.argmax(dim=-1), stable=True).to(device)
    out = torch.empty(len(tokens), model.ln_final.normalized_shape[0], device=device)
    tokens = tokens.to(device, non_blocking=True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        with torch.no_grad():
            out[idx] = text_features(model, tokens[idx])
    return out


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its weights, for prepare to rewrite without touching ``model``.

    prepare replaces modules (attention as two Linear layers, quantized layers, ONNX Runtime trunks) and casts
    parameters by assigning new data to them; it never writes into a weight's storage. So each parameter of the copy
    is a new Parameter over the same storage: a cast or a replaced module in the copy leaves ``model`` as it was
    (tests prove it for every path). Calibration prepares every path on such a copy, where a deepcopy would page in
    fresh weights (600 MB for ViT-B/32) for each.
    """
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)


class LinearSelfAttention(torch.nn.Module):
    """``nn.MultiheadAttention`` (batch first, self-attention) as two ``nn.Linear`` around SDPA.

    Quantizers replace ``nn.Linear`` modules; MultiheadAttention keeps its input projection
    as a bare parameter, a third of each block's weights, which they would leave in fp32.
    In fp32 this module computes what MultiheadAttention computes (tests compare them).
    """

    def __init__(self, mha: torch.nn.MultiheadAttention):
        super().__init__()
        if not self.fits(mha):
            raise ModelError("int8 needs batch-first attention with one packed input projection")
        self.heads = mha.num_heads
        self.in_proj = _linear_over(mha.in_proj_weight, mha.in_proj_bias)
        self.out_proj = _linear_over(mha.out_proj.weight, mha.out_proj.bias)

    @staticmethod
    def fits(mha: torch.nn.MultiheadAttention) -> bool:
        """Whether this module computes what ``mha`` computes: batch first, one packed input projection with a bias,
        no bias_k, bias_v or zero attention."""
        return (mha.batch_first and mha.in_proj_weight is not None and mha.in_proj_bias is not None
                and mha.out_proj.bias is not None and mha.bias_k is None and not mha.add_zero_attn)

    def forward(self, q, k=None, v=None, need_weights=False, attn_mask=None, key_padding_mask=None):
        """open_clip passes the same tensor as q, k and v; last_block_at passes queries at one position (q) and
        the whole sequence as keys and values (k is v), with the positions each query may not see."""
        b, n, d = q.shape

        def project(x):  # [3 (q, k, v), batch, heads, positions, head width]
            return self.in_proj(x).view(b, x.shape[1], 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        qkv = project(q)
        kv = qkv if k is None or k is q else project(k)  # a quantized in_proj cannot be split: its q part runs too
        if key_padding_mask is not None:
            if attn_mask is not None:
                raise ValueError("LinearSelfAttention takes attn_mask or key_padding_mask, not both")
            attn_mask = ~key_padding_mask[:, None, None, :]  # SDPA's boolean mask: True where a query may look
        out = F.scaled_dot_product_attention(qkv[0], kv[1], kv[2], attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def _linear_over(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    """An ``nn.Linear`` whose parameters are new Parameters over ``weight``'s and ``bias``'s storage: nothing is
    initialised at random only to be overwritten, nothing copied."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)
    layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return layer


def linear_attention(model: torch.nn.Module, where_it_fits: bool = False) -> torch.nn.Module:
    """Replace every MultiheadAttention in ``model`` (in place) by LinearSelfAttention; ``where_it_fits``: leave
    those it cannot compute as they are, instead of refusing the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            mha = isinstance(child, torch.nn.MultiheadAttention)
            if mha and (not where_it_fits or LinearSelfAttention.fits(child)):
                setattr(parent, name, LinearSelfAttention(child))
    return model
