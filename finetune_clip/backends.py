"""The precisions a headless model can run its trunks in, and ``prepare``, which puts it in one.

fp32 is exact and the default. bf16 and fp16 cast the trunks' weights. The int8 paths quantize every linear layer
dynamically (weights per output channel, activations at run time), on one of two maintained backends:

- ``int8-fbgemm``: torch.ao's fbgemm kernels, built here (``Int8Linear``); no compile, no files.
- ``int8-ort``: ONNX Runtime (``onnx_int8``): both trunks exported once per model and machine and kept on disk.

Which one is fastest depends on the CPU, so ``--precision int8`` and ``auto`` measure them (``autoprecision``).
"""
from __future__ import annotations

import functools
import warnings

import torch

from .model import linear_attention
from .onnx_int8 import quantize_int8_ort

CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # weights cast to a dtype
INT8 = ("int8-fbgemm", "int8-ort")  # the int8 backends; `--precision int8` takes the faster faithful one here
PRECISIONS = (*CAST, *INT8)         # what a cache can record


def prepare(model: torch.nn.Module, precision: str, device) -> torch.nn.Module:
    """``model`` (heads taken out) rewritten to run its trunks in ``precision`` on ``device``, in place."""
    if precision == "int8-fbgemm":
        return quantize_int8_fbgemm(model)
    if precision == "int8-ort":
        return quantize_int8_ort(model)
    if precision not in CAST:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    # Attention as two Linear layers: MultiheadAttention hands its input projection a length-first view, which
    # F.linear cannot fold into one matrix product, so every block ran one small product per position (bf16 on a
    # CPU also copied the weight for each: see docs/performance.md).
    return linear_attention(model, where_it_fits=True).to(device=device, dtype=CAST[precision])


def quantize_int8_fbgemm(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 on torch.ao's fbgemm kernels (``Int8Linear``), in place.

    The image trunk: every linear layer (its attention as two Linear layers, see LinearSelfAttention). The text
    trunk: the MLPs, and the attention's input projection where fbgemm's products are exact at full 8-bit range
    (``fbgemm_full_range``); its other attention layers stay fp32, because text features lose fidelity fastest there
    (min cosines per layer choice in docs/performance.md). Attention scores, embeddings and norms stay fp32, and so
    do the last block's out_proj and MLP, which run at one position per image or caption (model.last_block_at):
    int8 would save nothing there and add its noise.

    torch.ao's quantized kernels are deprecated in favour of torchao; they are kept because they need no compile,
    where torchao's fast kernels do (about a minute) and its eager ones ran 0.05x fp32 on an AVX2-only CPU.
    """
    model = model.float()
    linear_attention(model.visual)
    linear_attention(model.transformer, where_it_fits=True)
    full = fbgemm_full_range()
    at_one_position = tuple(f"{prefix}resblocks.{len(t.resblocks) - 1}.{part}" for prefix, t in
                            (("visual.transformer.", model.visual.transformer), ("transformer.", model.transformer))
                            for part in ("attn.out_proj", "mlp."))
    text_layers = (".mlp.", ".attn.in_proj") if full else (".mlp.",)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.startswith(at_one_position) \
                and (name.startswith("visual.") or any(part in name for part in text_layers)):
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, Int8Linear(module, full))
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated along with torch.ao.quantization
        try:
            weight = torch.quantize_per_channel(torch.ones(8, 64), torch.full((8,), 1 / 127, dtype=torch.double),
                                                torch.zeros(8, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(weight, None)
            out = torch.ops.quantized.linear_dynamic(torch.ones(4, 64), packed, reduce_range=False)
        except RuntimeError:  # a quantized engine without these kernels: torch.ao's own 7-bit path
            return False
    return bool(torch.allclose(out, torch.full_like(out, 64.0), rtol=1e-3))


class Int8Linear(torch.nn.Module):
    """``linear`` as fbgemm's dynamic int8 product: weights quantized once per output channel (symmetric, as torch.ao's
    per_channel_dynamic_qconfig does), activations per batch at run time over 8 bits (``full_range``, where
    fbgemm_full_range measured it exact) or 7.

    What torch.ao's quantize_dynamic builds (nnqd.Linear; tests compare them bitwise), built directly: nnqd.Linear
    first packs a placeholder weight of the layer's full size and then the real one, and its forward asks for 7-bit
    activations on every CPU.
    """

    def __init__(self, linear: torch.nn.Linear, full_range: bool):
        super().__init__()
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
