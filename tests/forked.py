"""`python cli.py ...` in a child forked from a server that has already imported torch and open_clip.

On 2 cores a fresh `python cli.py extract` spends about 9 s importing torch, torchvision and open_clip
before it does anything; the fault and resume tests start dozens of them. A fork server (the standard
library's multiprocessing "forkserver") pays the imports once. Each child is still its own process: its
own pid and session, file-size limit, signals and file descriptors, its own DataLoader workers, and the
same thread count as `python cli.py` (the server never runs a torch op before it forks). The child ends
the way the interpreter does: it runs the exit handlers (h5py closes what is open there) before its
status is taken, so a crash at exit still shows.

What a fork cannot give: environment variables torch reads when it is imported (ATEN_CPU_CAPABILITY),
and torchrun. Tests of those start a fresh interpreter with subprocess.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["torch", "open_clip", "h5py", "finetune_clip.cli", "finetune_clip.extract", "forked"])


def _child(argv, stdout, stderr, cwd, env, prepare):
    os.setsid()  # its own session, as subprocess's start_new_session: kill -9 of the group takes its workers too
    for fd, path in ((1, stdout), (2, stderr)):
        pipe = os.open(path, os.O_WRONLY)
        os.dup2(pipe, fd)
        os.close(pipe)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    multiprocessing.set_start_method(None, force=True)  # the platform's default for its DataLoader, not the server's
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    if prepare is not None:
        prepare[0](*prepare[1:])
    code = 0
    try:
        if argv[0] == "cli.py":
            from finetune_clip import cli
            cli.cli.main(args=list(argv[1:]), prog_name="cli.py")
        elif argv[0] == "pretrain.py":
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import pretrain
            pretrain.main(list(argv[1:]))
        else:
            raise ValueError(f"forked runs cli.py and pretrain.py, not {argv[0]}")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # as the interpreter would: the traceback on stderr, exit status 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Child:
    """A running child: poll(), wait(), kill_group(), and the text of its stdout and stderr so far.

    Its output goes through named pipes, as `subprocess` would give it pipes: a file-size limit set
    in the child must stop its cache, not its error message.
    """

    def __init__(self, argv, cwd=None, env=None, prepare=None):
        self._dir = tempfile.mkdtemp(prefix="forked-")
        self.args = list(argv)
        self._paths, self._seen, self._readers = [], [], []
        for name in ("stdout", "stderr"):
            path = os.path.join(self._dir, name)
            os.mkfifo(path)
            seen = bytearray()
            reader = threading.Thread(target=self._read, args=(path, seen), daemon=True)
            reader.start()
            self._paths.append(path)
            self._seen.append(seen)
            self._readers.append(reader)
        self._process = _context.Process(target=_child, args=(self.args, *self._paths, cwd, env, prepare))
        self._process.start()
        self.pid = self._process.pid
        self.returncode = None

    @staticmethod
    def _read(path, seen):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(4096):
                seen.extend(chunk)

    @property
    def stdout(self) -> str:
        return bytes(self._seen[0]).decode(errors="replace")

    @property
    def stderr(self) -> str:
        return bytes(self._seen[1]).decode(errors="replace")

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode  # negative: killed by that signal, as subprocess says
        return self.returncode

    def wait(self, timeout=300):
        self._process.join(timeout)
        if self._process.exitcode is None:
            self.kill_group()
            raise subprocess.TimeoutExpired(self.args, timeout, self.stdout, self.stderr)
        self._drain()
        return self.poll()

    def _drain(self):
        """Read what the child wrote; a child killed before it opened its pipes never will, so open them here."""
        for path, reader in zip(self._paths, self._readers):
            reader.join(10)
            if reader.is_alive():
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                reader.join(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def kill_group(self):
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.join(30)
        self._drain()


def start(argv, cwd=None, env=None, prepare=None) -> Child:
    """Start ``argv`` (``["cli.py", command, options...]``); ``prepare`` is (function, *args), run in the child
    first."""
    return Child(argv, cwd=cwd, env=env, prepare=prepare)


def run(argv, cwd=None, env=None, prepare=None, timeout=300, check=False) -> subprocess.CompletedProcess:
    """As subprocess.run(capture_output=True, text=True), for cli.py in a forked child."""
    child = start(argv, cwd=cwd, env=env, prepare=prepare)
    code = child.wait(timeout)
    done = subprocess.CompletedProcess(child.args, code, child.stdout, child.stderr)
    if check and code != 0:
        raise subprocess.CalledProcessError(code, child.args, done.stdout, done.stderr)
    return done


def wait_for(child: Child, seen, timeout=300, step=0.01) -> None:
    """Wait until ``seen(stderr_so_far)`` is true or the child has ended."""
    deadline = time.monotonic() + timeout
    while child.poll() is None and not seen(child.stderr):
        assert time.monotonic() < deadline, "the child showed no progress"
        time.sleep(step)


# ------------------------------------------------------------------ faults a child brings on itself
# ``prepare=(function, *args)`` runs one of these in the child before the command starts.

def file_size_limit(limit: int) -> None:
    """A soft RLIMIT_FSIZE (the hard one stays, as a user's full disk would not lift)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))


def writes_fail_from(method: str, call: int) -> None:
    """From the ``call``-th call of ``cache.Writer.<method>`` on, no write reaches the disk."""
    from finetune_clip import cache
    original, calls = getattr(cache.Writer, method), []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == call:
            file_size_limit(0)
        return original(self, *args)
    setattr(cache.Writer, method, failing)


def disk_fills_after_the_space_check() -> None:
    """Another program takes the free space between extract's space check and the cache's creation."""
    from finetune_clip import extract
    check = extract._check_space

    def check_then_fill(path, *args):
        check(path, *args)
        fill(path.parent / "filler")
    extract._check_space = check_then_fill


def fill(path: Path) -> Path:
    """Write zeros to ``path`` until the disk refuses."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(bytes(65536))
                fh.flush()
        except OSError:
            pass
    return path


def decoding_hangs_at_row(row: int, marker: str) -> None:
    """The decoding worker hangs on ``row``; ``marker`` appears once the first image batch is on disk."""
    from finetune_clip import cache
    from finetune_clip import extract
    decode, write = extract._ImageRows.__getitem__, cache.Writer.write_images

    def hang(self, i):
        if i == row:
            time.sleep(600)
        return decode(self, i)

    def write_and_tell(self, *args):
        write(self, *args)
        Path(marker).touch()
    extract._ImageRows.__getitem__, cache.Writer.write_images = hang, write_and_tell
