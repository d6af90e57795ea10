"""Run a Python script or module as on a CPU whose AMX the kernel does not grant: a measurement aid.

    .venv/bin/python benchmarks/no_amx.py cli.py bench --model ViT-B-32 --pretrained none
    .venv/bin/python benchmarks/no_amx.py -m pytest tests/test_precision.py

Linux gives a process AMX's tile registers only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``), and every library that uses AMX asks first and falls back to AVX-512 when refused: oneDNN
(bf16 matrix products, and torch's int8 through it), ONNX Runtime's MLAS (its int8 products), inductor's CPU
templates. This installs a seccomp filter that refuses that one request (EPERM), for this process and every
process it starts, then runs the script. So on an AMX Xeon the libraries run the kernels they run on a Xeon
whose hypervisor does not expose AMX (AVX512-BF16, VNNI and FP16, no AMX).

What it cannot cover: /proc/cpuinfo still lists amx_* (the per-machine record keys on the flags, so keep its
records apart with XDG_CACHE_HOME), and a library that uses AMX without asking would fault rather than fall back.
"""
from __future__ import annotations

import ctypes
import runpy
import struct
import sys

ARCH_PRCTL = 158                   # x86-64 syscall number
ARCH_REQ_XCOMP_PERM = 0x1023
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_EPERM = 0x7FFF0000, 0x00050000 | 1
LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06


def refuse_amx() -> None:
    """Refuse ``arch_prctl(ARCH_REQ_XCOMP_PERM, ...)`` from now on, in this process and its children."""
    program = [  # seccomp_data: nr at 0, arch at 4, args[0] at 16 (low half, little-endian)
        (LD_W_ABS, 0, 0, 4), (JEQ_K, 0, 4, AUDIT_ARCH_X86_64),
        (LD_W_ABS, 0, 0, 0), (JEQ_K, 0, 2, ARCH_PRCTL),
        (LD_W_ABS, 0, 0, 16), (JEQ_K, 1, 0, ARCH_REQ_XCOMP_PERM),
        (RET_K, 0, 0, RET_ALLOW), (RET_K, 0, 0, RET_EPERM)]
    code = b"".join(struct.pack("HBBI", *op) for op in program)
    buf = ctypes.create_string_buffer(code)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    libc = ctypes.CDLL(None, use_errno=True)
    prog = Prog(len(program), ctypes.addressof(buf))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                                                                 ctypes.byref(prog), 0, 0):
        raise SystemExit(f"no_amx: could not install the seccomp filter (errno {ctypes.get_errno()})")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    refuse_amx()
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).resolve().parent))
        runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
