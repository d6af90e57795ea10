"""A run killed at any moment resumes and ends with the same cache an uninterrupted run makes."""
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from finetune_clip import cache

import forked

ROOT = Path(__file__).resolve().parents[1]


def extract_cmd(annotations, images, path):
    """`python cli.py extract ...`, run by tests/forked.py (a forked child: its own process, no fresh imports)."""
    return ["cli.py", "extract", "--annotations", str(annotations), "--images", str(images), "--cache", str(path),
            "--pretrained", "none", "--batch-size", "4", "--workers", "1"]


def arrays(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("images/features", "images/status", "texts/features", "texts/status",
                                      "heads/visual_proj")}, dict(f.attrs)


def run_until(cmd, marker: re.Pattern, rng: random.Random, timeout=300) -> bool:
    """Start cmd; once its stderr shows marker, wait a random moment and SIGKILL it. True if it was killed.

    The kill follows the run's own progress, not a guess of how long the machine takes, so on
    a fast or a slow machine it lands inside the work (setup, image batches, caption windows).
    """
    proc = forked.start(cmd)
    forked.wait_for(proc, marker.search, timeout)
    time.sleep(rng.uniform(0, 0.3))
    killed = proc.poll() is None
    if killed:
        proc.kill_group()  # SIGKILL to its whole session: the decoding worker dies too
    proc.wait()
    return killed


def complete(path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False))
    except OSError:  # killed before its first flush: unreadable, and extract starts it afresh
        return False


def test_sigkill_at_random_points_then_resume(shapes, tmp_path):
    annotations, images = shapes
    ref = tmp_path / "ref.h5"
    forked.run(extract_cmd(annotations, images, ref), check=True)
    path = tmp_path / "killed.h5"
    rng = random.Random(0)
    # During setup, after the first image batch is written, and inside the caption windows.
    markers = (r"model: ", r"images:.*?\| *[1-9]\d*/", r"captions:")
    kills, finished = [], []
    for marker in markers:
        kills.append(run_until(extract_cmd(annotations, images, path), re.compile(marker), rng))
        finished.append(complete(path))
    assert sum(kills) >= 2 and not finished[1], (kills, finished)  # the next run had images left to resume
    done = forked.run(extract_cmd(annotations, images, path))
    assert done.returncode == 0, done.stderr
    (a, attrs_a), (b, attrs_b) = arrays(ref), arrays(path)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert attrs_a["fingerprint"] == attrs_b["fingerprint"] and attrs_b["complete"]


def test_unreadable_partial_file_is_started_afresh(shapes, tmp_path):
    annotations, images = shapes
    path = tmp_path / "broken.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(4096))  # an HDF5 signature and garbage
    out = forked.run(extract_cmd(annotations, images, path))
    assert out.returncode == 0, out.stderr
    assert "starting it afresh" in out.stderr + out.stdout
    assert cache.load(path).image_ok.all()


def test_second_extract_on_a_cache_in_use_fails_clearly(shapes, tmp_path):
    annotations, images = shapes
    path = tmp_path / "busy.h5"
    with cache.locked(path):
        out = forked.run(extract_cmd(annotations, images, path))
    assert out.returncode == 1
    assert "in use by another extract" in out.stderr


def test_two_process_torchrun_makes_the_same_cache(extracted, tmp_path):
    """gloo on CPU: rank 0 writes, both ranks compute; the file matches the single-process one."""
    path = tmp_path / "two.h5"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29533", str(ROOT / "cli.py"), "extract",
           "--annotations", str(extracted.annotations), "--images", str(extracted.images), "--cache", str(path),
           "--pretrained", "none", "--batch-size", str(extracted.batch_size), "--text-batch-size",
           str(extracted.text_batch_size), "--workers", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("images: 24 done") == 1  # one report, from rank 0
    (a, _), (b, _) = arrays(extracted.cache), arrays(path)
    # Each rank runs its own thread count (torchrun gives each one thread): summation order, and so the
    # last bits, differ from the one-process run. Rows, statuses and heads are the same exactly; features
    # within 1e-5 (the README's exactness claim across thread and process counts).
    for key in ("images/status", "texts/status", "heads/visual_proj"):
        assert np.array_equal(a[key], b[key]), key
    for key in ("images/features", "texts/features"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=key)
