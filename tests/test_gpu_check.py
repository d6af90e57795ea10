"""The prepared GPU measurement (benchmarks/gpu_check.py) runs end to end on a CPU with tiny sizes."""
import json
import subprocess
import sys

from conftest import ROOT


def test_gpu_check_runs_tiny_on_the_cpu(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", str(tmp_path), "--device", "cpu", "--images", "8",
                          "--model", "finetune_clip/pretrained/ShapesCLIP.json", "--reference-images", "4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report["runs"]) == {"project bf16", "project fp32", "project bf16, --decode cpu", "naive loop fp32",
                                   "naive loop bf16"}
    assert all(r["total_s"] > 0 for r in report["runs"].values()) and report["captions"] == 40
    same = report["fidelity"]["fp32, PIL decoding"]  # the same device, precision and decoding as the reference
    assert same["image_max_rel_err"] < 1e-5 and same["text_max_rel_err"] < 1e-5
    assert 0.99 < report["fidelity"]["bf16, PIL decoding"]["image_min_cos"] < 1.0
    assert "| project bf16 |" in out.stdout and "| naive loop bf16 |" in out.stdout
