"""benchmarks/avx2_only.py, the measurement aid that holds every library's kernels to AVX2 (or AVX2 and AVX-VNNI) by
answering CPUID itself."""
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = str(ROOT / "benchmarks" / "avx2_only.py")
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or shutil.which("cc") is None
    or "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split(),
    reason="needs x86-64 Linux with CPUID faulting (the cpuid_fault flag) and a C compiler")


@pytest.fixture(scope="module")
def xdg(tmp_path_factory):
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg"))}  # the library is compiled there


def run(xdg, *args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300, env=xdg)


def held(out: str) -> str:
    return out.split("held to AVX2", 1)[1]


def test_every_library_chooses_avx2_kernels_and_onnx_runtimes_signed_products_saturate(xdg):
    """torch's ATen reports AVX2, fbgemm's full-range product saturates (model.fbgemm_full_range) and so does ONNX
    Runtime's u8 x s8 one (onnx_int8.signed_weights_exact's probe): what they do without VNNI, whatever this CPU has."""
    done = run(xdg, "--check")
    assert done.returncode == 0, done.stderr[-2000:]
    out = held(done.stdout)
    assert "torch ATen kernels: AVX2" in out and "7-bit (no VNNI" in out and "u8 x s8: saturates" in out, done.stdout


def test_avx_vnni_keeps_onnx_runtimes_vnni_kernels_and_not_fbgemms(xdg):
    """With AVX-VNNI kept, ONNX Runtime's products are exact (it has AVX-VNNI kernels); fbgemm has none, and
    saturates as on AVX2."""
    done = run(xdg, "--avx-vnni", "--check")
    assert done.returncode == 0, done.stderr[-2000:]
    out = held(done.stdout)
    assert "torch ATen kernels: AVX2" in out and "7-bit (no VNNI" in out and "u8 x s8: exact" in out, done.stdout


def test_faults_that_are_not_cpuid_still_reach_the_program_or_kill_it(xdg):
    """A real segmentation fault goes to the handler the program installed (Python's faulthandler, by sigaction),
    a stack overflow included, and without one kills the process as it would have; the command's children run
    held too."""
    crash = "import ctypes; ctypes.string_at(0)"
    plain = run(xdg, sys.executable, "-c", crash)
    assert plain.returncode == -11, plain.stderr[-500:]
    handled = run(xdg, sys.executable, "-X", "faulthandler", "-c", crash)
    assert handled.returncode == -11 and "Fatal Python error: Segmentation fault" in handled.stderr, handled.stderr
    # A stack overflow too: faulthandler's handler runs on its alternate stack, and the tool's first handler must
    # run there as well, or the process dies without a word.
    overflow = "import sys; sys.setrecursionlimit(10**8)\nl = []\nfor i in range(10**6): l = [l]\nrepr(l)"
    handled = run(xdg, sys.executable, "-X", "faulthandler", "-c", overflow)
    assert handled.returncode == -11 and "Fatal Python error: Segmentation fault" in handled.stderr, handled.stderr
    child = ("import subprocess, sys; print(subprocess.run([sys.executable, '-c', 'import torch; "
             "print(torch.backends.cpu.get_cpu_capability())'], capture_output=True, text=True).stdout)")
    assert run(xdg, sys.executable, "-c", child).stdout.split() == ["AVX2"]
