"""int8 through ONNX Runtime: each trunk exported once, quantized dynamically, kept on disk and reused.

    model = quantize_int8_ort(model)        # model.visual and model.transformer now run in ONNX Runtime
    model_mod.image_features(model, pixels)  # the same calls as every other path

The first use on a machine exports both trunks with ``torch.onnx.export`` (the maintained, torch.export
based exporter) and quantizes them with ``onnxruntime.quantization.quantize_dynamic``: every linear
layer, weights per output channel, activations (unsigned 8-bit) per tensor at run time. The result is
kept under ``$XDG_CACHE_HOME/finetune-clip-flickr30k/onnx-int8/``, keyed by the trunks' weights and the
torch and ONNX Runtime versions, with a checksum of every file; later runs load it in about a second.
Files whose checksum fails are rebuilt, never used.

Weights are 8-bit over their full range: signed where ONNX Runtime's unsigned x signed products are exact on this
CPU (signed_weights_exact, measured: a CPU with VNNI sums the pairs into 32 bits), where they take its faster
kernels; unsigned elsewhere, because without VNNI signed 8-bit weights overflow the 16-bit pair sums. The norms,
the attention scores and the patch and token embeddings stay fp32. (Each weight type's speed and fidelity:
docs/performance.md, `make bench-weights`.)

The trunks are exported with their attention written out (``ExportBlocks``): the same arithmetic as open_clip's
``nn.MultiheadAttention``, in far fewer layout operations, each Transpose moving one axis, for which ONNX Runtime's
CPU Transpose has a dedicated copy (a five-axis permute, as ``scaled_dot_product_attention`` on the packed q, k and
v exports, goes through its general path; tests/test_int8_ort.py holds every transpose to one axis). Written out,
each trunk's last block also runs at the class token or the EOT alone, as the torch paths run it
(model.last_block_at): the text graph takes the EOT positions as a third input, ``at``.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from .model import LinearSelfAttention, ModelError, file_sha256, pools_class_token

FILES = ("visual.onnx", "transformer.onnx")
LAYOUT = 5  # bump when what is exported or how it is quantized changes


class ExportBlocks(torch.nn.Module):
    """An open_clip ``Transformer``'s blocks with the attention written out, for export only.

    One projection to q, k and v, split per head, softmax(q k^T / sqrt(d) + mask) v, one transpose back: the
    arithmetic of ``nn.MultiheadAttention`` on the same weights (tests/test_int8_ort.py holds it to open_clip's own
    forward), without the layout shuffles the exporter otherwise records for every block. Every transpose moves one
    axis, for which ONNX Runtime's CPU Transpose has a dedicated copy (see above).
    As in model.last_block_at, the last block computes its output at one position per sequence alone: the class
    token (``class_token``: the image trunk, output [batch, 1, width], which open_clip's pooling then reads), or
    the position ``at`` names (the text trunk's EOT, output [batch, width]); without either, at every position.
    """

    def __init__(self, transformer: torch.nn.Module, class_token: bool = False):
        super().__init__()
        self.blocks = transformer.resblocks
        self.class_token = class_token

    @staticmethod
    def fits(transformer: torch.nn.Module) -> bool:
        """Whether every block is the plain kind written out here: the attention LinearSelfAttention computes too
        (batch first, one packed q/k/v projection), no separate norm for keys and values."""
        return getattr(transformer, "batch_first", False) and all(
            isinstance(r.attn, torch.nn.MultiheadAttention) and LinearSelfAttention.fits(r.attn)
            and not hasattr(r, "ln_1_kv") for r in transformer.resblocks)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        for i, r in enumerate(self.blocks):
            heads = r.attn.num_heads
            qkv = torch.nn.functional.linear(r.ln_1(x), r.attn.in_proj_weight, r.attn.in_proj_bias)
            # q, k, v: [batch, length, heads, d] each
            q, k, v = qkv.reshape(batch, length, 3 * heads, width // heads).split(heads, dim=2)
            mask, n = attn_mask, length
            if i == len(self.blocks) - 1 and self.class_token:
                q, x, n = q[:, :1], x[:, :1], 1
            elif i == len(self.blocks) - 1 and at is not None:  # one query a caption, seeing the positions up to it
                rows = torch.arange(batch)
                q, x, n = q[rows, at].unsqueeze(1), x[rows, at].unsqueeze(1), 1
                mask = (torch.arange(length) <= at[:, None])[:, None, None, :]
            # Each transpose moves one axis (ONNX Runtime's dedicated copy); k goes straight to
            # [batch, heads, d, length].
            scores = (q.transpose(1, 2) * (width // heads) ** -0.5) @ k.permute(0, 2, 3, 1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            a = scores.softmax(-1) @ v.transpose(1, 2)
            x = x + r.ls_1(r.attn.out_proj(a.transpose(1, 2).reshape(batch, n, width)))
            x = x + r.ls_2(r.mlp(r.ln_2(x)))
        return x if at is None else x[:, 0]


@contextlib.contextmanager
def _written_out(model: torch.nn.Module):
    """Both trunks' blocks swapped for ``ExportBlocks`` while exporting (where they fit), then put back."""
    owners = [m for m in (model.visual, model) if ExportBlocks.fits(m.transformer)]
    kept = [m.transformer for m in owners]
    try:
        for m in owners:  # the image trunk's last block at the class token (open_clip pools that token)
            m.transformer = ExportBlocks(m.transformer, class_token=m is model.visual and pools_class_token(m))
        yield
    finally:
        for m, t in zip(owners, kept):
            m.transformer = t


class OnnxTrunk(torch.nn.Module):
    """One exported trunk in an ONNX Runtime session, called like the torch module it replaces."""

    proj = None  # a trunk without its head, as take_heads leaves the torch one

    def __init__(self, path: Path, threads: int):
        super().__init__()
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Waiting threads sleep instead of spinning, so they leave the cores to the decoding workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.takes_at = "at" in self.inputs  # model.text_features then passes the EOT positions

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                at: torch.Tensor | None = None) -> torch.Tensor:
        given = {"x": x.detach().float(), "attn_mask": attn_mask, "at": at}
        feeds = {name: given[name].contiguous().numpy() for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feeds)[0])


def root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune-clip-flickr30k" / "onnx-int8"


@functools.cache
def signed_weights_exact() -> bool:
    """Whether ONNX Runtime's products of unsigned 8-bit activations and signed 8-bit weights are exact here at full
    range. Without VNNI its kernels multiply them in pairs summed into 16 bits with saturation (vpmaddubsw), which
    255 x 127 x 2 overflows; with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) the pairs sum into 32 bits. Measured, not read
    from the CPU's flags: one MatMulInteger in which every pair would saturate, against its exact value."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    k = 256
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [k, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 16])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"a": np.full((4, k), 255, np.uint8), "b": np.full((k, 16), 127, np.int8)})[0]
    return bool((y == 255 * 127 * k).all())


def weight_type() -> str:
    return "signed 8-bit" if signed_weights_exact() else "unsigned 8-bit"


def key(model: torch.nn.Module) -> str:
    """The trunks' weights (names, shapes, values), the weight type, and the versions that export and quantize
    them."""
    import onnxruntime as ort
    signed = "; signed 8-bit weights" if signed_weights_exact() else ""  # unsigned keys are those of before
    h = hashlib.sha256(f"layout {LAYOUT}{signed}; torch {torch.__version__}; onnxruntime {ort.__version__}".encode())
    for part in (model.visual, model.transformer):
        for name, t in sorted(part.state_dict().items()):
            h.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _sound(folder: Path) -> str:
    """'' when the kept files are complete and match their checksums, else why not."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name in FILES:
            if file_sha256(folder / name) != manifest["sha256"][name]:
                return f"{name} does not match its checksum"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"incomplete ({type(exc).__name__})"
    return ""


def _export(model: torch.nn.Module, folder: Path, written_out: bool = True) -> None:
    """Both trunks, fp32, their attention written out (or, for comparison, as open_clip's blocks export), with the
    batch (and the caption length) left free."""
    size = model.visual.conv1.weight.shape[-1] * model.visual.grid_size[0]
    width = model.token_embedding.weight.shape[1]
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", min=2, max=model.attn_mask.shape[0])
    with _written_out(model) if written_out else contextlib.nullcontext():
        text = {"attn_mask": model.attn_mask[:8, :8]}
        shapes = {"x": {0: batch, 1: length}, "attn_mask": {0: length, 1: length}}
        if isinstance(model.transformer, ExportBlocks):  # written out: the text trunk's output at the EOT alone
            text["at"], shapes["at"] = torch.tensor([7, 3]), {0: batch}
        jobs = (("visual", model.visual, (torch.randn(2, 3, size, size),), {}, {"x": {0: batch}}),
                ("transformer", model.transformer, (torch.randn(2, 8, width),), text, shapes))
        for name, module, args, kwargs, shapes in jobs:
            # The exporter reports progress on stdout and warns about what it rewrites; none of it is the user's.
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), _quiet():
                torch.onnx.export(module, args, str(folder / f"{name}.fp32.onnx"), kwargs=kwargs,
                                  dynamic_shapes=shapes, input_names=["x", *kwargs],
                                  output_names=["features"], dynamo=True, verbose=False)


def _quantize(folder: Path, out: Path | None = None, signed: bool | None = None, reduce_range: bool = False,
              written_out: bool = True) -> None:
    """The fp32 exports in ``folder``, quantized into ``out`` (default: beside them). The shipped weights (``signed``
    None) are 8-bit at full range, signed where signed_weights_exact; the others are for the benchmarks' comparison."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    signed = signed_weights_exact() if signed is None else signed
    for name in FILES:
        source = folder / name.replace(".onnx", ".fp32.onnx")
        with _quiet():
            quantize_dynamic(source, (out or folder) / name,
                             weight_type=QuantType.QInt8 if signed else QuantType.QUInt8,
                             per_channel=True, reduce_range=reduce_range,
                             nodes_to_exclude=_at_one_position(source) if written_out else None)


def _at_one_position(path: Path) -> list[str]:
    """The weight MatMuls that run at one position per image or caption: the last block's out_proj, c_fc and c_proj
    (ExportBlocks writes each block's in_proj, out_proj, c_fc, c_proj in that order). They stay fp32: int8 would save
    nothing there and add its noise. (An image trunk that does not pool its class token runs that block at every
    position; there they stay fp32 too, a twelfth of its work.)"""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights][-3:]


@contextlib.contextmanager
def _quiet():
    import warnings
    logging.disable(logging.WARNING)  # quantize_dynamic advises pre-processing on the root logger, every call
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def build(model: torch.nn.Module, folder: Path) -> None:
    """Export and quantize into a new folder beside ``folder``, then move it into place whole."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _export(model, tmp)
        _quantize(tmp)
        manifest = {"layout": LAYOUT, "weights": weight_type(),
                    "sha256": {name: file_sha256(tmp / name) for name in FILES}}
        for p in tmp.glob("*.fp32.onnx*"):
            p.unlink()
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_int8_ort(model: torch.nn.Module) -> torch.nn.Module:
    """Replace both trunks of ``model`` (heads taken out) by their int8 ONNX Runtime sessions.

    ``model.int8_kernels`` says what ran and whether the files were built, rebuilt or reused.
    """
    model = model.float().eval()
    k = key(model)
    folder = root() / k
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{k}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun's ranks: one builds, the others wait and reuse
        why = _sound(folder) if folder.exists() else "not built yet"
        t0 = time.perf_counter()
        if why:
            try:
                build(model, folder)
            except Exception as exc:  # noqa: BLE001 - a full disk or an exporter failure, told in one line
                raise ModelError(f"int8-ort could not export the trunks into {folder.parent} "
                                 f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                                 "free space there or point XDG_CACHE_HOME elsewhere, or choose another "
                                 "--precision") from exc
        build_s = time.perf_counter() - t0
    import onnxruntime as ort
    threads = torch.get_num_threads()
    model.visual = OnnxTrunk(folder / "visual.onnx", threads)
    model.transformer = OnnxTrunk(folder / "transformer.onnx", threads)
    done = (f"built in {build_s:.0f} s" if why == "not built yet" else
            f"rebuilt in {build_s:.0f} s, the kept files were damaged: {why}" if why else "reused")
    model.int8_kernels = (f"ONNX Runtime {ort.__version__} dynamic int8, every linear layer, {weight_type()} weights "
                          f"({done}: {folder})")
    model.int8_build_s = build_s if why else 0.0
    return model


def built(model: torch.nn.Module) -> bool:
    """Whether this model's int8 files are on disk and sound (then the one-time cost is a load)."""
    folder = root() / key(model)
    return folder.exists() and not _sound(folder)
