"""Imports run one way: setup.cfg's import-linter contracts hold, and they break where a module imports upward."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = ["-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
        "--no-cache", "--config", str(ROOT / "setup.cfg")]


def lint(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the package found in ``package_parent`` (PYTHONPATH comes before the editable install)."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, *LINT], cwd=package_parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_package_keeps_every_import_contract():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_a_lazy_import_upward_breaks_the_layers_and_makes_a_cycle(tmp_path):
    """model (a stage) asking extract (above it) for something inside a function: the kind of import that made the
    cycles before, hidden from a reader at the top of the file."""
    shutil.copytree(ROOT / "finetune_clip", tmp_path / "finetune_clip", ignore=shutil.ignore_patterns("*.pt"))
    model = tmp_path / "finetune_clip" / "model.py"
    model.write_text(model.read_text() + "\n\ndef _upward():\n    from . import extract\n    return extract\n")
    out = lint(tmp_path)
    assert out.returncode != 0
    assert "finetune_clip.model -> finetune_clip.extract" in out.stdout
    assert "2 broken" in out.stdout  # the layers and the cycle


def test_probe_importing_the_model_breaks_the_cache_alone_contract(tmp_path):
    shutil.copytree(ROOT / "finetune_clip", tmp_path / "finetune_clip", ignore=shutil.ignore_patterns("*.pt"))
    probe = tmp_path / "finetune_clip" / "probe.py"
    probe.write_text(probe.read_text().replace("from . import metrics\n", "from . import metrics, model\n", 1))
    out = lint(tmp_path)
    assert out.returncode != 0 and "cache alone" in out.stdout and "BROKEN" in out.stdout
