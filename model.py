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
import functools
import hashlib
import json
import logging
import os
import socket
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # weights cast to a dtype
# int8 paths quantize instead: torchao (compiled where its kernels agree), torch.ao's fbgemm kernels, or
# ONNX Runtime (onnx_int8.py: exported and quantized once per model, kept on disk).
INT8 = ("int8", "int8-fbgemm", "int8-ort")
PRECISIONS = (*CAST, *INT8)


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
    pretrained = pretrained[5:] if pretrained.startswith("file:") else pretrained
    loaded = load_model(str(info["model"]), pretrained, seed=max(int(info.get("seed") or 0), 0))
    if loaded.arch != info["model"]:
        raise ModelError(f"rebuilt {loaded.arch}, but the cache was made with {info['model']}")
    return loaded


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


def prepare(model: torch.nn.Module, precision: str, device, compile: bool = True) -> torch.nn.Module:
    """The headless model in the precision extraction runs it in (int8: see quantize_int8)."""
    if precision == "int8":
        return quantize_int8(model, compile)
    if precision == "int8-fbgemm":
        return quantize_int8_fbgemm(model)
    if precision == "int8-ort":
        from onnx_int8 import quantize_int8_ort
        return quantize_int8_ort(model)
    # Attention as two Linear layers: MultiheadAttention hands its input projection a length-first view, which
    # F.linear cannot fold into one matrix product, so every block ran one small product per position against the
    # weight expanded per position (bf16 on a CPU copied that expansion: 0.35x fp32 on 8 captions on an AMX Xeon).
    model = linear_attention(model, where_it_fits=True).to(device=device, dtype=CAST[precision])
    return in_place_activations(model) if CAST[precision] == torch.float32 else model


def sharing_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its weights, for prepare to rewrite without touching ``model``.

    prepare replaces modules (attention as two Linear layers, quantized layers, ONNX Runtime trunks) and casts
    parameters by assigning new data to them; it never writes into a weight's storage. So each parameter of the copy
    is a new Parameter over the same storage: a cast or a replaced module in the copy leaves ``model`` as it was
    (tests prove it for every path). ``--precision auto`` calibrates every path on such a copy: a deepcopy's fresh
    weights (600 MB for ViT-B/32) took 1.04, 0.77 and 0.32 s to page in for a first calibration's three paths (an
    Intel Xeon with AVX-512 VNNI and BF16, its AMX refused, 2 cores).
    """
    memo = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}
    memo.update({id(b): b.detach() for b in model.buffers()})
    return copy.deepcopy(model, memo)


def encode_queries(info: dict, queries: list[str]) -> np.ndarray:
    """Pre-projection features of free-text queries, from the same trunk and precision as the cache."""
    loaded = load_like_cache(info)
    take_heads(loaded.model)
    net = prepare(loaded.model, str(info.get("precision", "fp32")), "cpu", compile=False)  # a few queries
    with torch.no_grad():
        return text_features(net, loaded.tokenizer(queries)).numpy()


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
    initialised at random only to be overwritten, nothing copied (0.15 s of random numbers and the attention's
    weights paged in afresh, for each prepare of ViT-B/32 on that Xeon)."""
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


class InPlaceActivation(torch.nn.Module):
    """An MLP's GELU or QuickGELU computed into its input, the hidden layer's output, which nothing else holds.

    The same arithmetic, bit for bit (tests compare), without a second tensor of the hidden layer's size (39 MB for
    a 64-image batch of ViT-B/32, written and read back at every block). A small gain, measured with
    `tools/in_place_ab.py` (random-init ViT-B/32 with QuickGELU, an Intel Xeon with AVX-512 VNNI, BF16 and AMX, 2
    threads): with AMX refused, int8-fbgemm images 1.01-1.05x and captions 0.98-1.05x as fast as with open_clip's
    activations (four runs), fp32 1.02-1.07x and 1.02-1.06x (two); as lent, int8-fbgemm 1.05x and 1.06x, fp32 1.01x
    and 1.01x (one), but bf16 0.95-1.05x and 0.96-0.99x (three), so prepare uses it where activations are fp32 only.
    Where autograd needs the input (a trunk being trained), it runs out of place.
    """

    def __init__(self, activation: torch.nn.Module):
        super().__init__()
        self.activation = activation

    @staticmethod
    def fits(module: torch.nn.Module) -> bool:
        return type(module) in (torch.nn.GELU, open_clip.transformer.QuickGELU)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return self.activation(x)
        if isinstance(self.activation, torch.nn.GELU):
            return torch.ops.aten.gelu_(x, approximate=self.activation.approximate)
        return x.mul_(torch.mul(x, 1.702).sigmoid_())  # QuickGELU: x * sigmoid(1.702 * x)


def in_place_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Every transformer MLP's activation (open_clip's Sequential c_fc, gelu, ...) as InPlaceActivation, in place."""
    for module in list(model.modules()):
        if isinstance(module, torch.nn.Sequential) and list(dict(module.named_children()))[:2] == ["c_fc", "gelu"] \
                and InPlaceActivation.fits(module.gelu):
            module.gelu = InPlaceActivation(module.gelu)
    return model


def quantize_int8(model: torch.nn.Module, compile: bool = True) -> torch.nn.Module:
    """Dynamic int8 (torchao) for every linear layer of both trunks: weights per output channel,
    activations per token at run time. The patch embedding, norms and attention scores stay fp32.

    torchao's fast int8 kernels come from ``torch.compile``. ``make bench`` on an AVX-512 VNNI CPU:
    compiled 3.9-4.8x fp32, eager 2.9-3.0x; with torch held to AVX2 code paths the compiled kernels
    disagree (see _compiled_agrees) and eager runs 1.2-1.6x. Compiling costs tens of seconds once per process
    (shapes are dynamic, so caption lengths do not recompile); ``compile=False`` skips it for a
    handful of search queries.
    """
    _quiet_compiler()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    model = linear_attention(model.float())
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    model.int8_kernels = "eager"
    if compile:
        eager = (model.visual, model.transformer)
        model.visual = torch.compile(model.visual, dynamic=True)
        model.transformer = torch.compile(model.transformer, dynamic=True)
        model.int8_kernels = "compiled"
        if not _compiled_agrees(model, *eager):
            # Seen with inductor's AVX2 code for these kernels (ATEN_CPU_CAPABILITY=avx2): NaN in half the
            # outputs. Eager torchao computes the same quantization correctly, only slower.
            model.visual, model.transformer = eager
            model.int8_kernels = "eager: the compiled int8 kernels disagreed with eager ones on this CPU"
    return model


@torch.no_grad()
def _compiled_agrees(model, eager_visual, eager_transformer) -> bool:
    """Run both compiled trunks once (this is also their compile) against eager torchao on fixed inputs."""
    gen = torch.Generator().manual_seed(0)
    size = model.visual.conv1.weight.shape[-1] * model.visual.grid_size[0]
    px = torch.randn(2, 3, size, size, generator=gen)
    width = model.token_embedding.weight.shape[1]
    x = torch.randn(2, 9, width, generator=gen)
    mask = model.attn_mask[:9, :9]
    pairs = ((model.visual(px), eager_visual(px)),
             (model.transformer(x, attn_mask=mask), eager_transformer(x, attn_mask=mask)))
    return all(bool(torch.isfinite(a).all()) and float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.999
               for a, b in pairs)


def quantize_int8_fbgemm(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 on torch.ao's fbgemm kernels (Int8Linear, what ``quantize_dynamic`` builds): weights per
    output channel, activations per batch at run time. In the image trunk every linear layer (its
    attention as two Linear layers, see LinearSelfAttention). In the text trunk, where fbgemm's products are exact
    with activations over their full 8-bit range (``fbgemm_full_range``: a CPU with VNNI), the attention's input
    projection and the MLPs; elsewhere the MLPs alone, with 7-bit activations. Attention scores, the patch
    embedding, the token embedding and the norms stay fp32, and so do the last block's out_proj and MLP, which run
    at one position per image or caption (last_block_at).

    Why the text trunk keeps some of its attention in fp32 (random-init ViT-B/32, min cosine of text features to
    fp32 on 256 Flickr-length captions, an Intel Xeon with VNNI): with 7-bit activations the MLPs alone gave 0.99904
    and any attention layer more fell below 0.999 (0.99828 with the input projection). With 8-bit activations the
    MLPs gave 0.99964, with the input projection 0.99931 (text 1.99x fp32 against 1.52x), and with out_proj as well
    0.99907, too near the line for a model with larger activations (2.20x). torch.ao's quantized kernels are
    deprecated in favour of torchao, and are kept as a fallback for one measured reason: they need no compile, where
    eager torchao ran 0.05x fp32 on an AVX2-only EPYC and 1.25x on that Xeon's text, and compiled torchao costs about a
    minute of compile first. ``--precision auto`` takes it only where it measures fastest and faithful.
    """
    model = in_place_activations(model.float())
    linear_attention(model.visual)
    linear_attention(model.transformer, where_it_fits=True)  # folded as in prepare; its in_proj quantized below
    full = fbgemm_full_range()
    # The last block's out_proj and MLP run at one position per image or caption (last_block_at): int8 would save
    # nothing there and add its noise, so they stay fp32.
    at_one_position = tuple(f"{prefix}resblocks.{len(t.resblocks) - 1}.{part}" for prefix, t in
                            (("visual.transformer.", model.visual.transformer), ("transformer.", model.transformer))
                            for part in ("attn.out_proj", "mlp."))
    text_layers = (".mlp.", ".attn.in_proj") if full else (".mlp.",)
    layers = [name for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.startswith(at_one_position)
              and (name.startswith("visual.") or any(part in name for part in text_layers))]
    # In place: the caller's model is this path's own (linear_attention has rewritten it). One layer per thread:
    # quantize_per_channel and linear_prepack run on one core each, and preparing ViT-B/32 (79 layers) took 0.90 s
    # with them one after another, 0.53-0.56 s on two threads (tools/calibration_steps.py's "prepare", an Intel Xeon
    # with AVX-512 VNNI and AMX refused, 2 cores), every layer packed the same to the bit.
    owners = [(model.get_submodule(parent), leaf) for parent, _, leaf in (name.rpartition(".") for name in layers)]
    with ThreadPoolExecutor(torch.get_num_threads()) as pool:
        quantized = list(pool.map(lambda owned: Int8Linear(getattr(*owned), full), owners))
    for (owner, leaf), layer in zip(owners, quantized):
        setattr(owner, leaf, layer)
    model.int8_kernels = ("fbgemm (torch.ao's dynamic int8 kernels): image trunk all linear layers, text trunk "
                          + ("MLPs and attention input projections, 8-bit activations" if full
                             else "MLPs, 7-bit activations"))
    return model


@functools.cache
def fbgemm_full_range() -> bool:
    """Whether fbgemm's int8 products are exact on this CPU with activations over their full 8-bit range.

    Without VNNI, fbgemm multiplies unsigned activations by signed weights in pairs summed into 16 bits with
    saturation (vpmaddubsw), which 255 x 127 x 2 overflows: that is why torch.ao quantizes activations to 7 bits on
    x86 (reduce_range). With VNNI the pairs sum into 32 bits and the full range is exact. Measured, not read from the
    CPU's flags: one product in which every pair would saturate (it reads 32.4 instead of 64 where it does), against
    its exact value.
    """
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated along with torch.ao.quantization
        try:
            weight = torch.quantize_per_channel(torch.ones(8, 64), torch.full((8,), 1 / 127, dtype=torch.double),
                                                torch.zeros(8, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(weight, None)
            out = torch.ops.quantized.linear_dynamic(torch.ones(4, 64), packed, reduce_range=False)
        except RuntimeError:  # a quantized engine without these kernels: torch.ao's own 7-bit path, as before
            return False
    return bool(torch.allclose(out, torch.full_like(out, 64.0), rtol=1e-3))


class Int8Linear(torch.nn.Module):
    """``linear`` as fbgemm's dynamic int8 product: weights quantized once per output channel (symmetric, as torch.ao's
    per_channel_dynamic_qconfig does), activations per batch at run time over 8 bits (``full_range``, where
    fbgemm_full_range measured it exact) or 7.

    What torch.ao's quantize_dynamic builds (nnqd.Linear; tests compare them bitwise), built directly: nnqd.Linear
    first packs a placeholder weight of the layer's full size and then the real one, and its forward asks for 7-bit
    activations on every CPU. Packing once saves 0.2 s of ViT-B/32's quantizing (cProfile on an Intel Xeon with
    AVX-512 VNNI, AMX refused: 0.37 s of packing, not 0.59).
    """

    def __init__(self, linear: torch.nn.Linear, full_range: bool):
        super().__init__()
        import warnings
        from torch.ao.quantization.observer import PerChannelMinMaxObserver
        weight = linear.weight.detach().float()
        observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        observer(weight)
        scale, zero_point = observer.calculate_qparams()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated along with torch.ao.quantization
            qweight = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(qweight, linear.bias)
        self.reduce_range = not full_range
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=self.reduce_range).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"activations={'7' if self.reduce_range else '8'}-bit")


def _quiet_compiler() -> None:
    """Three messages torchao and inductor print on every CPU run that say nothing a user can act on."""
    import warnings
    for name in ("torch.utils._pytree", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not implement _stable_hash_for_caching.*")
