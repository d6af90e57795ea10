"""benchmarks/no_amx.py, the measurement aid that stands an AMX Xeon in for one whose AMX is not granted."""
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASK = ("import ctypes\n"
       "libc = ctypes.CDLL(None, use_errno=True)\n"
       "print(libc.syscall(158, 0x1023, 18), ctypes.get_errno())\n")  # arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="x86-64 Linux syscalls")
def test_no_amx_refuses_the_request_for_amx_tiles_and_nothing_else(tmp_path):
    """Under the tool the request fails with EPERM (1), as the libraries' fallbacks expect; without it the kernel
    grants it (0) or, on a CPU without AMX, refuses it otherwise (EINVAL). Other syscalls, such as starting a child
    process, still work under the filter, and the child inherits it."""
    plain = subprocess.run([sys.executable, "-c", ASK], capture_output=True, text=True, check=True).stdout.split()
    if plain == ["-1", "1"]:
        pytest.skip("this process already runs under benchmarks/no_amx.py (children inherit its filter)")
    script = tmp_path / "ask.py"
    script.write_text(ASK + "import subprocess, sys\n" f"print(subprocess.run([sys.executable, '-c', {ASK!r}], "
                      "capture_output=True, text=True).stdout)\n")
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.split()
    under = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "no_amx.py"), str(script)], capture_output=True,
                           text=True, check=True).stdout.split()
    assert under == ["-1", "1", "-1", "1"]
    assert plain[:2] != ["-1", "1"] and plain[:2] == plain[2:]
