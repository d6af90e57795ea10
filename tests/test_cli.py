"""Every command driven through click's CliRunner with real argument lists."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from finetune_clip import cli

from conftest import make_synthetic_cache

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def invoke(*args):
        return CliRunner().invoke(cli.cli, [str(a) for a in args], catch_exceptions=False)
    return invoke


def test_every_command_has_help_with_an_example_kept_as_written(run):
    for name, command in cli.cli.commands.items():
        result = run(name, "--help")
        assert result.exit_code == 0, name
        assert "Example" in result.output, name
        examples = [ln for ln in result.output.splitlines() if ln.strip().startswith("finetune-clip ")]
        assert examples, name
        for line in examples:  # click rewraps paragraphs; the examples are marked to be printed as they are
            assert line.strip() in command.help, (name, line)


def test_the_command_list_shows_each_summary_whole_and_there_is_a_version(run):
    from finetune_clip import __version__
    listing = run("--help").output.split("Commands:")[1].splitlines()
    summaries = {ln.split()[0]: " ".join(ln.split()[1:]) for ln in listing if ln.strip()}
    assert set(summaries) == set(cli.cli.commands)
    for name, summary in summaries.items():
        assert summary == cli.cli.commands[name].help.splitlines()[0], name  # not cut off with "..."
    assert run("--version").output.strip().endswith(__version__)


def test_probe_help_shows_every_default_and_they_are_the_settings_defaults(run):
    from finetune_clip.probe import ProbeSettings
    text = " ".join(run("probe", "--help").output.split("Options:")[1].split())
    for field, shown in (("lr", "0.003"), ("weight_decay", "0.1"), ("reg_to_init", "0.0"), ("batch_size", "128"),
                         ("loss", "multi"), ("epochs", "100"), ("patience", "10"), ("seed", "0")):
        assert str(getattr(ProbeSettings, field)) == shown
        option = "--" + field.replace("_", "-")
        assert f"[default: {shown}" in text.split(option, 1)[1].split("--", 1)[0], option
    assert "[default: freeze-logit- scale]" in text or "[default: freeze-logit-scale]" in text
    assert "[default: interpolate]" in text and "[default: 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1]" in text


def test_splits_by_image(run, tmp_path):
    rows = [(f"im{i}.jpg", f"caption {j} of {i}") for i in range(50) for j in range(5)]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(tmp_path / "a.csv", index=False)
    result = run("splits", "--annotations", tmp_path / "a.csv", "--out", tmp_path / "out.csv", "--seed", 1)
    assert result.exit_code == 0, result.output
    out = pd.read_csv(tmp_path / "out.csv")
    assert out.groupby("image")["split"].nunique().max() == 1
    assert out.drop_duplicates("image")["split"].value_counts().to_dict() == {"train": 40, "val": 5, "test": 5}
    assert "train" in result.output and "captions" in result.output
    again = run("splits", "--annotations", tmp_path / "a.csv", "--out", tmp_path / "out2.csv", "--seed", 1)
    assert again.exit_code == 0 and (tmp_path / "out.csv").read_text() == (tmp_path / "out2.csv").read_text()


def test_extract_probe_eval(run, shapes, tmp_path):
    annotations, images = shapes
    cache_path = tmp_path / "c.h5"
    r = run("extract", "--annotations", annotations, "--images", images, "--cache", cache_path,
            "--pretrained", "none", "--workers", 0, "--batch-size", 16)
    assert r.exit_code == 0, r.output
    assert "24 done, 0 failed" in r.output and "random init" in r.output
    r = run("probe", "--cache", cache_path, "--epochs", 3, "--batch-size", 8)
    assert r.exit_code == 0, r.output
    assert Path("checkpoints/linearprobe_best.pt").is_file()
    history = json.loads(Path("artifacts/training_history.json").read_text())
    assert len(history["epochs"]) == 4
    r = run("eval", "--cache", cache_path, "--split", "test")
    assert r.exit_code == 0, r.output
    assert "text->image R@5" in r.output and "delta" in r.output
    results = json.loads(Path("artifacts/final_evaluation_results.json").read_text())
    assert results["split"] == "test" and results["n_captions"] == 5 * results["n_images"]
    assert results["probe"]["checkpoint"] == "checkpoints/linearprobe_best.pt"
    assert results["cache"]["pretrained"] == "none"


def test_demo_runs_end_to_end(run):
    r = run("demo", "--images", 60, "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "small CLIP" in r.output and "zero-shot" in r.output and "probe" in r.output
    results = json.loads(Path("artifacts/final_evaluation_results.json").read_text())
    assert results["cache"]["model"] == "ShapesCLIP" and "probe" in results
    assert len(pd.read_csv("data/demo/target/annotations.csv")) == 300


def test_demo_keeps_the_random_vit_option(run):
    r = run("demo", "--model", "random-vit-b-32", "--images", 20, "--workers", 0)
    assert r.exit_code == 0, r.output
    results = json.loads(Path("artifacts/final_evaluation_results.json").read_text())
    assert results["cache"]["model"] == "ViT-B-32" and results["cache"]["pretrained"] == "none"


def test_errors_are_one_line_and_nonzero(run, tmp_path):
    (tmp_path / "bad.csv").write_text("picture,text\na.jpg,hello\n")
    r = run("splits", "--annotations", tmp_path / "bad.csv", "--out", tmp_path / "o.csv")
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert "picture" in r.output and "accepted" in r.output
    r = run("eval", "--cache", make_synthetic_cache(tmp_path / "c.h5"), "--checkpoint", tmp_path / "none.pt")
    assert r.exit_code == 1 and "checkpoint not found" in r.output


def test_probe_and_eval_never_load_open_clip(tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5")
    code = ("import sys, cli\n"
            f"cli.cli(['probe', '--cache', r'{path}', '--epochs', '1', '--out', r'{tmp_path / 'x.pt'}',"
            f" '--history', r'{tmp_path / 'h.json'}'], standalone_mode=False)\n"
            f"cli.cli(['eval', '--cache', r'{path}', '--checkpoint', r'{tmp_path / 'x.pt'}',"
            f" '--out', r'{tmp_path / 'r.json'}'], standalone_mode=False)\n"
            "print('LOADED' if {'open_clip', 'finetune_clip.model', 'finetune_clip.extract'} & set(sys.modules)"
            " else 'CLEAN')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("CLEAN")


def test_probe_and_eval_take_splits_from_other_annotations(run, tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5", n_images=60)
    names = [f"img{i:04d}.jpg" for i in range(60)]
    split = ["train"] * 30 + ["val"] * 10 + ["test"] * 20  # the cache itself has 9 test images
    pd.DataFrame({"image": names, "caption": ["x"] * 60, "split": split}).to_csv(tmp_path / "s.csv", index=False)
    assert run("probe", "--cache", path, "--annotations", tmp_path / "s.csv", "--epochs", 2).exit_code == 0
    r = run("eval", "--cache", path, "--annotations", tmp_path / "s.csv", "--split", "test")
    assert r.exit_code == 0, r.output
    assert json.loads(Path("artifacts/final_evaluation_results.json").read_text())["n_images"] == 20


def test_bad_option_values_are_named(run, tmp_path):
    path = make_synthetic_cache(tmp_path / "c.h5")
    for bad in (",", "fast", "1e-3,x"):
        r = run("probe", "--cache", path, "--lr", bad)
        assert r.exit_code == 2 and "--lr" in r.output and "comma list" in r.output


def test_a_command_exits_without_the_collectors_last_pass_over_every_object(tmp_path):
    """The command line freezes the collector's objects at exit (cli.skip_final_collection): an exit hook registered
    before the command runs after it, and finds the objects frozen. Without it they are not, and Python's last full
    collection walks every object torch and open_clip made, about 1 s at the end of every command."""
    code = ("import atexit, gc, runpy, sys\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
            "sys.argv = ['cli.py'] + sys.argv[1:]\n"
            "runpy.run_path('cli.py', run_name='__main__')\n")
    csv = tmp_path / "a.csv"
    csv.write_text("image,caption\na.jpg,a dog\nb.jpg,a cat\n")
    out = subprocess.run([sys.executable, "-c", code, "splits", "--annotations", str(csv), "--out",
                          str(tmp_path / "s.csv")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split("frozen ")[-1]) > 10_000


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_command_lines_malloc_reuses_a_freed_tensors_memory_instead_of_paging_it_in_again():
    """A 64 MiB tensor made and freed twenty times: glibc alone maps it afresh each time (a page fault per 4 KiB
    page, 16,384 a time); with keep_freed_memory the heap grows for the first few and then serves every later one
    from memory already paged in. Counted in page faults over the last ten, not in seconds."""
    code = ("import resource, sys, torch; from finetune_clip import cli\n"
            "if sys.argv[1] == 'keep': assert cli.keep_freed_memory()\n"
            "for _ in range(10): torch.empty(1 << 24).fill_(1)\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(10): torch.empty(1 << 24).fill_(1)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    faults = {how: int(subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, check=True,
                                      cwd=ROOT).stdout) for how in ("glibc", "keep")}
    assert faults["glibc"] > 10 * 16_384 * 0.9
    assert faults["keep"] < 16_384


def test_the_precision_choices_are_the_ones_extract_runs():
    """The command line lists --precision's choices without importing extract (and torch) for --help."""
    from finetune_clip import extract
    option = next(p for p in cli.cli.commands["extract"].params if p.name == "precision")
    assert tuple(option.type.choices) == extract.CHOICES
