"""How much of the text trunk int8 can take at min cosine >= 0.999, and what more would buy: a measurement aid.

    .venv/bin/python tools/int8_text_fidelity.py
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2 .venv/bin/python tools/int8_text_fidelity.py   # fbgemm's AVX2 kernels

Random-init ViT-B/32, 256 Flickr-length captions (sorted windows, as extraction runs them). For the text trunk's MLPs,
then with the attention's in_proj, then with its out_proj as well (the last block's out_proj and MLP stay fp32, as
int8-fbgemm keeps them), the min cosine of text features to fp32 with:
- fbgemm, 7-bit activations per tensor (what int8-fbgemm runs where fbgemm_full_range is false: AVX2);
- fbgemm, 8-bit activations and weights held to +-64, whose products AVX2's 16-bit pair sums hold exactly;
- the same 7-bit quantization computed in float64, activation scales per tensor and per row (no such kernel
  ships in fbgemm: the per-row line says what one would buy).
First it checks on this CPU's fbgemm kernels whether a product of 8-bit activations (255) with +-64 and with +-127
weights comes out exact. Last, the text speed of int8-fbgemm's 7-bit MLPs with and without the in_proj in int8 too
(best of three over 512 captions): the most that letting the in_proj in could buy, whatever its scales.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import cli  # noqa: E402
import extract  # noqa: E402
import model as model_mod  # noqa: E402

LAYER_SETS = {"MLPs": (".mlp.",), "+ in_proj": (".mlp.", ".attn.in_proj"),
              "+ out_proj": (".mlp.", ".attn.in_proj", ".attn.out_proj")}


def product_is_exact(weight_max: int) -> bool:
    """255 x weight_max summed over 64 pairs, on fbgemm's kernels with 8-bit activations, against its exact value."""
    weight = torch.quantize_per_channel(torch.full((8, 64), float(weight_max)), torch.ones(8, dtype=torch.double),
                                        torch.zeros(8, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(weight, None)
    out = torch.ops.quantized.linear_dynamic(torch.full((4, 64), 255.0), packed, reduce_range=False)
    return bool((out == 255 * weight_max * 64).all())


def weights_to_64(linear: torch.nn.Linear) -> model_mod.Int8Linear:
    """Int8Linear with 8-bit activations and its weights quantized per output channel to +-64."""
    layer = model_mod.Int8Linear(linear, full_range=True)
    weight = linear.weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 64).clamp_min(1e-12).double()
    qweight = torch.quantize_per_channel(weight, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
    layer.packed = torch.ops.quantized.linear_prepack(qweight, linear.bias)
    return layer


class Float64Quantized(torch.nn.Module):
    """A linear layer as 7-bit activations (per tensor or per row, asymmetric, as fbgemm's dynamic range) times
    8-bit weights per output channel (symmetric), in float64."""

    def __init__(self, linear: torch.nn.Linear, per_row: bool):
        super().__init__()
        weight = linear.weight.detach().double()
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.weight, self.bias, self.per_row = (weight / scale).round() * scale, linear.bias.detach().double(), per_row

    def forward(self, x):
        flat = x.double().reshape(-1, x.shape[-1])
        if self.per_row:
            lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
        else:
            lo, hi = flat.min(), flat.max()
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / 127
        zero = (-lo / scale).round()
        q = ((flat / scale).round() + zero).clamp(0, 127)
        return (((q - zero) * scale) @ self.weight.T + self.bias).reshape(*x.shape[:-1], -1).to(x.dtype)


def with_text_layers(model, parts, make) -> torch.nn.Module:
    """model prepared as fp32 (attention as two Linear layers), the text trunk's layers named by ``parts`` made by
    ``make``, except the last block's out_proj and MLP (one position a caption: int8-fbgemm keeps them fp32)."""
    net = model_mod.prepare(model_mod.sharing_copy(model), "fp32", "cpu")
    last = f"transformer.resblocks.{len(net.transformer.resblocks) - 1}."
    for name, module in list(net.named_modules()):
        if (name.startswith("transformer.") and isinstance(module, torch.nn.Linear) and any(p in name for p in parts)
                and not (name.startswith(last) and (".mlp." in name or ".out_proj" in name))):
            parent, _, leaf = name.rpartition(".")
            setattr(net.get_submodule(parent), leaf, make(module))
    return net


def main() -> None:
    warnings.simplefilter("ignore")  # quantized tensors are deprecated along with torch.ao.quantization
    cli.keep_freed_memory()  # as the command line runs it
    torch.manual_seed(0)
    name, _ = bench.cpu_name_and_flags()
    print(f"{name} (flags: {bench.isa_flags()}); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"fbgemm, 8-bit activations: 255 x 64 exact {product_is_exact(64)}, 255 x 127 exact {product_is_exact(127)}")
    loaded = model_mod.load_model("ViT-B-32", "none")
    model = loaded.model
    model_mod.take_heads(model)
    tokens = loaded.tokenizer(bench.flickr_like_captions(512))
    batch = extract.resolve(extract.ExtractSettings(annotations=Path("."), images=Path("."),
                                                    cache=Path("."))).text_batch_size
    with torch.no_grad():
        reference = extract.encode_window(model, tokens[:256], batch, "cpu")
        makers = {"fbgemm, 7-bit activations": lambda m: model_mod.Int8Linear(m, full_range=False),
                  "fbgemm, 8-bit activations, weights +-64": weights_to_64,
                  "float64, 7-bit, per tensor": lambda m: Float64Quantized(m, per_row=False),
                  "float64, 7-bit, per row": lambda m: Float64Quantized(m, per_row=True)}
        print("min cosine of text features to fp32:", *LAYER_SETS, sep="  ")
        for label, make in makers.items():
            cosines = [float(torch.nn.functional.cosine_similarity(
                extract.encode_window(with_text_layers(model, parts, make), tokens[:256], batch, "cpu"),
                reference).min()) for parts in LAYER_SETS.values()]
            print(f"  {label:42}", "  ".join(f"{c:.5f}" for c in cosines), flush=True)
        nets = {"fp32": model_mod.prepare(model_mod.sharing_copy(model), "fp32", "cpu")}
        for label in ("MLPs", "+ in_proj"):
            nets[label] = with_text_layers(model, LAYER_SETS[label], lambda m: model_mod.Int8Linear(m, False))
        rate = {label: len(tokens) / bench.best_of(lambda: extract.encode_window(net, tokens, batch, "cpu"))
                for label, net in nets.items()}
    print(f"text, fbgemm 7-bit: MLPs {rate['MLPs'] / rate['fp32']:.2f}x fp32, with the in_proj "
          f"{rate['+ in_proj'] / rate['fp32']:.2f}x ({rate['+ in_proj'] / rate['MLPs']:.2f}x the MLPs alone)")


if __name__ == "__main__":
    main()
