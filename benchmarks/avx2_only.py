"""Run a command as on a CPU with AVX2 and FMA but no AVX-512, VNNI, BF16 or AMX, such as the AVX2-only AMD EPYC
this project has met, or with ``--avx-vnni`` as on one that adds AVX-VNNI (VNNI on 256-bit registers: Intel's
Core processors from the 12th generation on, whose AVX-512 is off): a measurement aid.

    .venv/bin/python benchmarks/avx2_only.py .venv/bin/python cli.py bench --model ViT-B-32 --pretrained none
    .venv/bin/python benchmarks/avx2_only.py --avx-vnni .venv/bin/python benchmarks/int8_text_pairs.py 20
    .venv/bin/python benchmarks/avx2_only.py [--avx-vnni] --check

Every library here picks its kernels from CPUID: torch's ATen and fbgemm (through cpuinfo), oneDNN, MKL and
ONNX Runtime's MLAS. This compiles benchmarks/cpuid_mask.c (a C compiler is needed, once: the library is kept under
$XDG_CACHE_HOME) and runs the command with it preloaded, which makes CPUID fault (Linux's CPUID faulting, the
``cpuid_fault`` flag) and answers it with those features cleared, in the command and every process it starts.
Environment variables can hold torch, oneDNN, MKL and fbgemm to AVX2 (ATEN_CPU_CAPABILITY=avx2 and the like), but
no variable reaches ONNX Runtime's kernels; this reaches them all, and ``--check`` shows that each one chose AVX2.

What it cannot cover: the cores stay this machine's (an Intel core runs AVX2 code at its own speed, not an
EPYC's, with its own caches), /proc/cpuinfo still lists the real flags (the per-machine record keys on them, so
keep its records apart with XDG_CACHE_HOME), and glibc's own string functions chose theirs before the library
was loaded (GLIBC_TUNABLES below holds them to AVX2 as well).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("cpuid_mask.c")
# Leaf 7 of CPUID, bits cleared: subleaf 0 EBX: AVX512F, DQ, IFMA, PF, ER, CD, BW, VL; ECX: VBMI, VBMI2, VNNI,
# BITALG, VPOPCNTDQ; EDX: 4VNNIW, 4FMAPS, VP2INTERSECT, AMX-BF16, AVX512-FP16, AMX-TILE, AMX-INT8. Subleaf 1 EAX:
# AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA; EDX: AVX-VNNI-INT8, AVX-NE-CONVERT, AMX-COMPLEX.
AVX2_MASK = "0.b=dc230000;0.c=5842;0.d=3c0010c;1.a=a00030;1.d=130"
AVX_VNNI_MASK = AVX2_MASK.replace("1.a=a00030", "1.a=a00020")  # AVX-VNNI (subleaf 1, EAX bit 4) kept
GLIBC_AVX2 = "glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512CD,-AVX512BW,-AVX512VL"  # what its string functions use

CHECK = """
import torch; from finetune_clip import backends, onnx_int8
print("torch ATen kernels:", torch.backends.cpu.get_cpu_capability())
print("fbgemm int8 activations:", "8-bit (VNNI: exact at full range)" if backends.fbgemm_full_range()
      else "7-bit (no VNNI: full range saturates)")
print("ONNX Runtime u8 x s8:", "exact (VNNI)" if onnx_int8.signed_weights_exact() else "saturates (no VNNI)")
"""


def preload_library() -> Path:
    """The compiled cpuid_mask.c, built once per source under $XDG_CACHE_HOME."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune-clip-flickr30k"
    library = cache / f"cpuid_mask-{digest}.so"
    if not library.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        compiler = os.environ.get("CC", "cc")
        try:
            subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE), "-ldl"], check=True)
        except (OSError, subprocess.CalledProcessError) as error:
            raise SystemExit(f"avx2_only: could not compile {SOURCE.name} with {compiler} ({error}); set CC")
        partial.replace(library)
    return library


def avx2_environment(avx_vnni: bool = False) -> dict[str, str]:
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text().split():
        raise SystemExit("avx2_only: this CPU or kernel cannot fault on CPUID (no cpuid_fault in /proc/cpuinfo)")
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [str(preload_library()), env.get("LD_PRELOAD")]))
    env["CPUID_MASK"] = AVX_VNNI_MASK if avx_vnni else AVX2_MASK
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), GLIBC_AVX2]))
    return env


def main() -> None:
    avx_vnni = sys.argv[1:2] == ["--avx-vnni"]
    args = sys.argv[1 + avx_vnni:]
    if not args:
        raise SystemExit(__doc__)
    env = avx2_environment(avx_vnni)
    if args[0] == "--check":
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        held = "held to AVX2" + " and AVX-VNNI" * avx_vnni
        for label, run_env in (("as this CPU is", dict(os.environ)), (held, env)):
            print(f"{label}:", flush=True)
            subprocess.run([sys.executable, "-c", CHECK], env={**run_env, "PYTHONPATH": path}, check=True)
        return
    os.execvpe(args[0], args, env)


if __name__ == "__main__":
    main()
