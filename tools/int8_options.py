"""The int8 options this project measured and does not ship, measured again on the machine at hand, so a CPU of
another kind can say whether one of them wins there. Random-init ViT-B/32, both trunks, against torch fp32:
speed (Flickr-like captions, 64 random images; fp32 timed again beside each row) and min cosine (16 images,
256 captions), as `make bench` does.

- int8-fbgemm's own layers packed for torch's oneDNN quantized engine (``torch.backends.quantized.engine =
  "onednn"``) instead of fbgemm, beside int8-fbgemm as shipped; these two rows need nothing beyond the project;

- OpenVINO: fp32 (its own kernels), int8 weights only (NNCF ``compress_weights``, INT8_ASYM) and static int8
  (NNCF ``quantize``, transformer preset, calibrated on the very images and captions it is measured on,
  which flatters it);
- int8-ort as shipped, and with signed 7-bit weights (``reduce_range``, the fast kernels without VNNI) on one
  kind of the text trunk's linear layers at a time, the rest unsigned 8-bit (as shipped without VNNI);
- ONNX Runtime's MatMulNBits: 8-bit weights in blocks of 32, activations quantized per block (accuracy level 4).

OpenVINO and NNCF are not dependencies of the project; install them beside it, for instance

    .venv/bin/pip install --target /tmp/ov openvino nncf && PYTHONPATH=/tmp/ov .venv/bin/python tools/int8_options.py
"""
import copy
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import extract  # noqa: E402
import model as model_mod  # noqa: E402
import onnx_int8  # noqa: E402


class OpenVinoTrunk(torch.nn.Module):
    """One trunk compiled by OpenVINO for this CPU, called like the torch module it replaces."""

    proj = None

    def __init__(self, core, ov_model, threads: int):
        super().__init__()
        self.compiled = core.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                             "PERFORMANCE_HINT": "LATENCY",
                                                             "INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()
        self.n_inputs = len(self.compiled.inputs)

    def forward(self, x, attn_mask=None):
        given = (x, attn_mask)[:self.n_inputs]
        out = self.request.infer([t.detach().float().contiguous().numpy() for t in given])
        return torch.from_numpy(np.array(out[0]))


def linear_roles(path: Path) -> dict:
    """{role: [node names]} of the text trunk's linear layers in the exported graph, told apart by their weights'
    (in, out) shape: (w, 3w) attention in_proj, (w, w) out_proj, (w, 4w) MLP c_fc, (4w, w) MLP c_proj."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    roles = {"attention in_proj": [], "attention out_proj": [], "MLP c_fc": [], "MLP c_proj": []}
    for node in graph.node:
        dims = shapes.get(node.input[1], ()) if node.op_type == "MatMul" and len(node.input) > 1 else ()
        k, n = dims if len(dims) == 2 else (0, 0)
        role = ("attention in_proj" if n == 3 * k else "attention out_proj" if n == k else
                "MLP c_fc" if n == 4 * k else "MLP c_proj" if 4 * n == k else None) if k else None
        if role:
            roles[role].append(node.name)
    return roles


def on_onednn(model) -> torch.nn.Module:
    """int8-fbgemm's layers (model.Int8Linear) packed for torch's oneDNN quantized engine instead of fbgemm: the same
    weights and activation scheme, oneDNN's kernels (AMX where the CPU grants it)."""
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "onednn"  # the packed weights keep the engine they were packed for
    try:
        return model_mod.prepare(model_mod.sharing_copy(model), "int8-fbgemm", "cpu")
    finally:
        torch.backends.quantized.engine = engine


def main() -> None:
    torch.manual_seed(0)
    name = bench.cpu_name_and_flags()[0]
    threads = torch.get_num_threads()
    print(f"{name} (flags: {bench.isa_flags()}); torch {torch.__version__}, {threads} threads")
    loaded = model_mod.load_model("ViT-B-32", "none")
    model = loaded.model
    model_mod.take_heads(model)
    batch = extract.resolve(extract.ExtractSettings(annotations=Path("."), images=Path("."),
                                                    cache=Path("."))).text_batch_size
    tokens = loaded.tokenizer(bench.flickr_like_captions(2048))
    px = torch.randn(64, 3, 224, 224)

    def row(label, q):
        # fp32 timed again beside each row: within one run this machine's speed drifted by a fifth.
        fp32 = bench.against_fp32(model, model, px, tokens, batch)
        img, cap, ci, ct = bench.against_fp32(q, model, px, tokens, batch)
        print(f"{label:54}  image {img / fp32[0]:.2f}x  text {cap / fp32[1]:.2f}x  min cosine {ci:.5f} / {ct:.5f}",
              flush=True)

    def with_trunks(visual, transformer):
        q = copy.deepcopy(model)
        q.visual, q.transformer = visual, transformer
        return q

    row("int8-fbgemm as shipped", model_mod.prepare(model_mod.sharing_copy(model), "int8-fbgemm", "cpu"))
    row("int8-fbgemm's layers on oneDNN's kernels", on_onednn(model))
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        sys.exit(f"int8_options: {exc}; install OpenVINO and NNCF beside the project (see this file's docstring)")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    print(f"OpenVINO {ov.__version__}")
    logging.disable(logging.WARNING)  # NNCF and quantize_dynamic report progress and advice on the root logger
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        onnx_int8._export(model, folder)
        exported = [folder / f.replace(".onnx", ".fp32.onnx") for f in onnx_int8.FILES]
        core = ov.Core()
        row("OpenVINO fp32", with_trunks(*(OpenVinoTrunk(core, core.read_model(str(p)), threads) for p in exported)))
        weights = [nncf.compress_weights(core.read_model(str(p)), mode=nncf.CompressWeightsMode.INT8_ASYM)
                   for p in exported]
        row("OpenVINO int8 weights (NNCF compress_weights)", with_trunks(*(OpenVinoTrunk(core, m, threads)
                                                                           for m in weights)))
        images = [px[i:i + 8].numpy() for i in range(0, len(px), 8)]
        embedded = []  # what the text trunk is fed, taken from the project's own text path as it runs
        hook = model.transformer.register_forward_pre_hook(
            lambda _, args, kwargs: embedded.append([args[0].numpy(), kwargs["attn_mask"].numpy()]), with_kwargs=True)
        with torch.no_grad():
            for s in range(0, 512, batch):
                model_mod.text_features(model, tokens[s:s + batch])
        hook.remove()
        static = [nncf.quantize(core.read_model(str(p)), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                                subset_size=len(data)) for p, data in zip(exported, (images, embedded))]
        row("OpenVINO static int8 (NNCF quantize, transformer)", with_trunks(*(OpenVinoTrunk(core, m, threads)
                                                                               for m in static)))
        text = exported[1]
        onnx_int8._quantize(folder)
        row(f"int8-ort as shipped ({onnx_int8.weight_type()} everywhere)",
            with_trunks(*(onnx_int8.OnnxTrunk(folder / f, threads) for f in onnx_int8.FILES)))
        roles = linear_roles(text)
        counts = {role: len(nodes) for role, nodes in roles.items()}
        if set(counts.values()) != {len(model.transformer.resblocks)}:
            sys.exit(f"int8_options: the exported text graph's linear layers were not told apart ({counts}, one "
                     "a block expected); the exporter's node names changed")
        for role, nodes in roles.items():
            out = folder / role.replace(" ", "_")
            out.mkdir()
            quantize_dynamic(text, out / "signed.onnx", weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=True, nodes_to_quantize=nodes)
            quantize_dynamic(out / "signed.onnx", out / "mixed.onnx", weight_type=QuantType.QUInt8, per_channel=True,
                             nodes_to_exclude=nodes)
            row(f"int8-ort, signed 7-bit {role} only (text)",
                with_trunks(model.visual, onnx_int8.OnnxTrunk(out / "mixed.onnx", threads)))
            shutil.rmtree(out)
        # Weight-only int8 in blocks of 32 with activations quantized per block too (accuracy level 4): the most
        # faithful int8 ONNX Runtime has, through its MatMulNBits kernels.
        for f in exported:
            q = MatMulNBitsQuantizer(str(f), bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                     op_types_to_quantize=("MatMul",))  # every linear layer is a MatMul in the export
            q.process()
            q.model.save_model_to_file(str(f.with_suffix(".nbits.onnx")), False)
        row("ONNX Runtime MatMulNBits, 8-bit, blocks of 32", with_trunks(*(
            onnx_int8.OnnxTrunk(f.with_suffix(".nbits.onnx"), threads) for f in exported)))


if __name__ == "__main__":
    main()
