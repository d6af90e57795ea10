"""A full disk or a dying worker never leaves a wrong cache that passes for a good one.

A full disk is simulated portably with a soft RLIMIT_FSIZE in a child process (Python ignores
SIGXFSZ, so the write fails with EFBIG): at sizes read off an uninterrupted run's own layout
for the cache's creation, and set to 0 from a chosen write on for the later stages (an image
batch, a caption window, the seal; their space was taken at creation, so only a failing write,
not a filling disk, can stop them). Where the machine lets a test mount a small tmpfs, a real
'No space left on device' is tried too. Every case checks the exit, the one line, that readers refuse the cache,
and that the same command then finishes it to the uninterrupted run's result, bitwise (same
command, same process and thread counts). The children are `cli.py extract` forked from a server
that imported torch once (tests/forked.py).
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from finetune_clip import cache, cli, extract

import forked
from conftest import SMALL_CLIP
from test_resume import arrays

# The project's small CLIP architecture (random init): these tests are about the file, and it runs in moments.
ARGS = ["--model", str(SMALL_CLIP[0]), "--pretrained", "none", "--batch-size", "8", "--text-batch-size", "16"]


def cmd(shapes, path, workers=0):
    annotations, images = shapes
    return ["cli.py", "extract", "--annotations", str(annotations), "--images", str(images), "--cache", str(path),
            "--workers", str(workers), *ARGS]


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    path = tmp_path_factory.mktemp("fault_ref") / "ref.h5"
    forked.run(cmd(shapes, path), check=True)
    with h5py.File(path, "r") as f:
        layout = {name: f[name].id.get_chunk_info(0).byte_offset for name in ("images/features", "texts/features")}
    return path, layout  # where the features start: the header (names, captions, heads) lies before


def assert_refused_then_resumed(shapes, reference, path, out, stage: str, resume: bool = True):
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr and "Segmentation" not in out.stderr, out.stderr[-2000:]
    assert str(path) in lines[0] and stage in lines[0] and "run the same command again to resume" in lines[0], lines
    assert "images:" not in out.stdout and "time:" not in out.stdout  # no success summary
    if path.exists():
        with pytest.raises(cache.CacheError, match="not complete"):
            cache.load(path)
        r = CliRunner().invoke(cli.cli, ["eval", "--baseline-only", "--cache", str(path)])
        assert r.exit_code == 1 and "not complete" in r.output
    if not resume:
        return
    done = forked.run(cmd(shapes, path))
    assert done.returncode == 0, done.stderr[-2000:]
    (a, attrs_a), (b, attrs_b) = arrays(reference[0]), arrays(path)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert attrs_b["complete"] and attrs_a["fingerprint"] == attrs_b["fingerprint"]


def test_a_full_disk_while_creating_leaves_no_file(shapes, reference, tmp_path):
    """The heads alone are larger than the limit: the new cache cannot be written, and no part of it stays."""
    path = tmp_path / "c.h5"
    out = forked.run(cmd(shapes, path), prepare=(forked.file_size_limit, 64 << 10))
    assert "the file size limit was reached (File too large)" in out.stderr
    assert not path.exists() and not Path(f"{path}.tmp").exists()
    assert_refused_then_resumed(shapes, reference, path, out, "the new cache", resume=False)  # nothing to resume


def test_the_feature_space_is_taken_when_the_cache_is_created(shapes, reference, tmp_path):
    """A limit between the header and the finished size stops the run at creation, before any trunk runs."""
    path = tmp_path / "c.h5"
    limit = (reference[1]["images/features"] + os.path.getsize(reference[0])) // 2
    out = forked.run(cmd(shapes, path), prepare=(forked.file_size_limit, limit))
    assert "images:" not in out.stderr and not path.exists()
    assert_refused_then_resumed(shapes, reference, path, out, "the new cache's feature space", resume=False)


@pytest.mark.parametrize("method, call, stage", [("write_images", 2, "image rows 8-15"),
                                                 ("write_texts", 1, "caption rows 0-119"),
                                                 ("finish", 1, "the seal")])
def test_a_failed_write_at_each_stage_fails_cleanly_and_resumes(shapes, reference, tmp_path, method, call, stage):
    """Every write fails from a chosen moment on: an image batch (after one was written), a caption window, the seal."""
    path = tmp_path / "c.h5"
    out = forked.run(cmd(shapes, path), prepare=(forked.writes_fail_from, method, call))
    assert "the file size limit was reached (File too large)" in out.stderr, out.stderr[-2000:]
    if method == "write_images":  # the first batch reached the disk, the second did not
        with h5py.File(path, "r") as f:
            assert (f["images/status"][:8] == cache.DONE).all() and (f["images/status"][8:] == cache.PENDING).all()
    assert_refused_then_resumed(shapes, reference, path, out, stage)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root on Linux only); skip, saying why, where the machine does not allow it."""
    mounted = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a real full disk needs root on Linux to mount a small tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs: {r.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _run_and_fill_when(shapes, path, ready):
    child = forked.start(cmd(shapes, path))
    deadline = time.monotonic() + 300
    while not ready() and child.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    filler = forked.fill(path.parent / "filler")
    child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, child.stdout, child.stderr), filler


def test_a_real_full_disk_before_creation_fails_cleanly_and_resumes(shapes, reference, tmpfs):
    """The check before the run passes; then another program fills the disk before the cache is written."""
    point = tmpfs(os.path.getsize(reference[0]) * 5 // 4)
    path = point / "c.h5"
    out = forked.run(cmd(shapes, path), prepare=(forked.disk_fills_after_the_space_check,))
    assert "the disk is full (No space left on device)" in out.stderr, out.stderr[-2000:]
    assert re.search(r"needs about [\d.,]+ MB more and [\d.,]+ [kM]B are free", out.stderr), out.stderr[-2000:]
    assert not path.exists() and not Path(f"{path}.tmp").exists()
    (point / "filler").unlink()
    assert_refused_then_resumed(shapes, reference, path, out, "the new cache")


def test_a_disk_that_fills_mid_run_cannot_stop_it(shapes, reference, tmpfs):
    """The feature space was taken at creation: the rows still reach the disk, and the cache equals the reference."""
    point = tmpfs(os.path.getsize(reference[0]) * 5 // 4)
    path = point / "c.h5"
    out, filler = _run_and_fill_when(shapes, path, path.exists)
    assert out.returncode == 0, out.stderr[-2000:]
    assert shutil.disk_usage(point).free < 64 << 10  # the disk really was full
    (a, attrs_a), (b, attrs_b) = arrays(reference[0]), arrays(path)
    for key in a:
        assert np.array_equal(a[key], b[key], equal_nan=True), key
    assert attrs_b["complete"] and attrs_a["fingerprint"] == attrs_b["fingerprint"]


def test_a_cache_that_clearly_will_not_fit_is_refused_before_any_work(shapes, reference, tmpfs):
    point = tmpfs(os.path.getsize(reference[0]) // 2)
    out = forked.run(cmd(shapes, point / "c.h5"))
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert re.match(r"Error: cache .*c\.h5 needs about [\d.]+ MB more, but only [\d.]+ [kM]B are free", line), line
    assert "images:" not in out.stderr and not (point / "c.h5").exists()


def test_space_check_refuses_warns_or_notes(tmp_path, monkeypatch):
    path, notes, log = tmp_path / "c.h5", [], open(os.devnull, "w")
    monkeypatch.setattr(cache, "free_bytes", lambda _: 900)
    with pytest.raises(extract.ExtractError, match="needs about 1.0 kB more, but only 0.9 kB are free"):
        extract._check_space(path, 1000, notes, log)
    monkeypatch.setattr(cache, "free_bytes", lambda _: 1100)
    import io
    log = io.StringIO()
    extract._check_space(path, 1000, notes, log)
    assert log.getvalue().startswith("warning: cache") and not notes
    monkeypatch.setattr(cache, "free_bytes", lambda _: None)
    extract._check_space(path, 1000, notes, log)
    assert notes and "could not be measured" in notes[0]


def test_the_size_estimate_is_close_to_the_finished_cache(reference):
    with h5py.File(reference[0], "r") as f:
        estimate = cache.estimate_bytes(f["images/name"][:], f["images/split"][:], f["texts/caption"][:],
                                        {k: f["heads"][k][()] for k in ("visual_proj", "text_projection")})
    actual = os.path.getsize(reference[0])
    assert actual <= estimate <= 1.05 * actual + (64 << 10), (estimate, actual)


def test_a_folder_that_cannot_be_written_gets_one_line_before_any_work(shapes, tmp_path, tmpfs):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    annotations, images = shapes
    base = ["extract", "--annotations", str(annotations), "--images", str(images), *ARGS]
    r = CliRunner().invoke(cli.cli, [*base, "--cache", str(blocker / "sub" / "c.h5")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"{blocker} is a file, not a folder; choose another --cache" in r.output
    point = tmpfs(1 << 20)
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    r = CliRunner().invoke(cli.cli, [*base, "--cache", str(point / "c.h5")])
    assert r.exit_code == 1 and "Read-only file system" in r.output and r.output.count("\n") == 1, r.output


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker through /proc")
def test_a_killed_decoding_worker_ends_the_run_in_one_line_and_it_resumes(shapes, reference, tmp_path):
    path, marker = tmp_path / "c.h5", tmp_path / "first_batch_written"
    proc = forked.start(cmd(shapes, path, workers=1), prepare=(forked.decoding_hangs_at_row, 12, str(marker)))
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    killed_at = time.monotonic()
    proc.wait(timeout=120)
    stderr = proc.stderr
    assert time.monotonic() - killed_at < 30
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-2000:]
    line = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert len(line) == 1 and re.search(r"a decoding worker \(pid \d+\) died", line[0]), stderr[-2000:]
    assert "run the same command again to resume" in line[0]
    with pytest.raises(cache.CacheError, match="not complete"):
        cache.load(path)
    with h5py.File(path, "r") as f:
        assert (f["images/status"][:8] == cache.DONE).all() and (f["images/status"][8:] == cache.PENDING).all()
    done = forked.run(cmd(shapes, path, workers=1))
    assert done.returncode == 0, done.stderr[-2000:]
    (a, _), (b, _) = arrays(reference[0]), arrays(path)
    for key in a:  # decoding in a worker process changes no number: the trunks run in the same process
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


# ---------------------------------------------------------------- rows marked done that hold nothing

def _damage(path, image_rows=(), caption_rows=()):
    """A cache as an old failed write left it: rows marked done whose features never reached the disk."""
    with h5py.File(path, "r+") as f:
        for r in image_rows:
            f["images/features"][r] = np.nan
        for r in caption_rows:
            f["texts/features"][r] = np.nan


def test_rows_marked_done_without_features_are_damage_to_every_reader(synthetic_cache):
    _damage(synthetic_cache, image_rows=[3], caption_rows=[7, 8])
    with pytest.raises(cache.CacheError, match=r"is damaged \(1 image and 2 caption rows marked done hold non-finite"):
        cache.load(synthetic_cache)
    for args in (["eval", "--baseline-only"], ["probe", "--epochs", "1"], ["compare", "--b", "baseline"],
                 ["search", "a query"], ["export", "--embeddings", str(synthetic_cache.parent / "emb")]):
        r = CliRunner().invoke(cli.cli, [*args, "--cache", str(synthetic_cache)])
        assert r.exit_code == 1 and r.output.count("\n") == 1 and "is damaged" in r.output, (args, r.output)


def test_a_resumed_extract_redoes_rows_that_hold_nothing_and_damaged_chunks(extracted, tmp_path):
    from test_cache import _flip_a_byte_inside
    original = arrays(extracted.cache)[0]
    for damage in ("nan", "checksum"):
        path = tmp_path / f"{damage}.h5"
        shutil.copy(extracted.cache, path)
        if damage == "nan":
            _damage(path, image_rows=[2, 3], caption_rows=[5])
        else:
            _flip_a_byte_inside(path, "images/features")
        with pytest.raises(cache.CacheError, match="is damaged"):
            cache.load(path)
        settings = extract.ExtractSettings(**{**extracted.__dict__, "cache": path})
        summary = extract.extract(settings, log=open(os.devnull, "w"))
        assert any("extracting them again" in n for n in summary.notes), summary.notes
        again = arrays(path)[0]
        for key in original:  # the same process and configuration as the original extraction
            assert np.array_equal(original[key], again[key], equal_nan=True), (damage, key)
        assert cache.load(path).image_ok.all()


def test_a_cache_hdf5_refuses_to_write_is_rebuilt_from_its_sound_rows(extracted, tmp_path, monkeypatch):
    """A flush that failed part-way can leave HDF5's own index inconsistent, and HDF5 then refuses writes
    ('addr overflow'). Resume rebuilds the file from the rows that read back sound, and redoes the rest."""
    original = arrays(extracted.cache)[0]
    path = tmp_path / "inconsistent.h5"
    shutil.copy(extracted.cache, path)
    _damage(path, image_rows=[2], caption_rows=[5])
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    repair, calls = cache.Writer.repair, []

    def refused_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Can't synchronously write data (addr overflow, addr = 2658600, size = 2616)")
        return repair(self)
    monkeypatch.setattr(cache.Writer, "repair", refused_once)
    settings = extract.ExtractSettings(**{**extracted.__dict__, "cache": path})
    summary = extract.extract(settings, log=open(os.devnull, "w"))
    note = next(n for n in summary.notes if "rebuilt file" in n)
    assert f"kept the {len(original['images/status']) - 1} image and {len(original['texts/status']) - 1} caption" \
           in note, note
    again = arrays(path)[0]
    for key in original:  # the same process and configuration as the original extraction
        assert np.array_equal(original[key], again[key], equal_nan=True), key
    assert not Path(f"{path}.salvage").exists()
