"""What a GPU user writes without this project (clip-retrieval style), the baseline benchmarks/gpu_check.py runs beside
the project: a DataLoader with workers, batch 256, open_clip's encode_image / encode_text at the full context,
features back to the host. Prints one JSON line of timings. From ../shared/gpu/naive_peer.py, with a device and a
model argument so that it also runs on a CPU with tiny sizes.

    python benchmarks/naive_peer.py ANN IMAGES fp32|bf16 WORKERS [DEVICE] [MODEL]
"""
import json
import sys
import time

t0 = time.perf_counter()
import open_clip  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def main():
    ann, images, precision, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    device = sys.argv[5] if len(sys.argv) > 5 else "cuda"
    name = sys.argv[6] if len(sys.argv) > 6 else "ViT-B-32"
    if name.endswith(".json"):
        from finetune_clip import model as model_mod
        name = model_mod.register_config(name)[0]
    model, _, pre = open_clip.create_model_and_transforms(name, pretrained=None)
    model = model.to(device).eval()
    tok = open_clip.get_tokenizer(name)
    d = pd.read_csv(ann)
    names, caps = list(dict.fromkeys(d.image)), list(d.caption)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(names)

        def __getitem__(self, i):
            return pre(Image.open(f"{images}/{names[i]}").convert("RGB"))

    dl = torch.utils.data.DataLoader(DS(), batch_size=256, num_workers=workers, prefetch_factor=4 if workers else None)
    ctx = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16")
    t1 = time.perf_counter()
    out = []
    with torch.inference_mode(), ctx:
        for x in dl:
            out.append(model.encode_image(x.to(device, non_blocking=True)).float().cpu())
        t2 = time.perf_counter()
        for i in range(0, len(caps), 256):
            out.append(model.encode_text(tok(caps[i:i + 256]).to(device)).float().cpu())
    t3 = time.perf_counter()
    print(json.dumps({"setup_s": t1 - t0, "images_s": t2 - t1, "captions_s": t3 - t2, "total_s": t3 - t0,
                      "images": len(names), "captions": len(caps)}))


if __name__ == "__main__":
    main()
