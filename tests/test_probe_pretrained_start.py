"""The probe for a pretrained start: WiSE-FT interpolation, the multi-positive loss, eval before any probe."""
import io
import math
import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from finetune_clip import cache, cli, metrics, probe

FAST = probe.ProbeSettings(lr=1e-2, batch_size=32, epochs=6, patience=6, seed=0)


def test_checkpoint_records_the_alpha_chosen_on_validation(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    result = probe.train(c, FAST, tmp_path / "p.pt", tmp_path / "h.json", log=io.StringIO())
    heads, ckpt = probe.load_checkpoint(tmp_path / "p.pt", c)
    mix = ckpt["interpolation"]
    assert {"0.0", "1.0"} <= set(mix["val_by_alpha"])
    assert mix["val_by_alpha"][str(mix["alpha"])] == max(mix["val_by_alpha"].values())
    assert json.loads((tmp_path / "h.json").read_text())["interpolation"] == mix
    # the saved heads are exactly that mix of the pretrained heads and the trained ones
    val = c.split("val")
    chosen = mix["val_by_alpha"][str(mix["alpha"])]
    assert metrics.mean_recall(probe.evaluate_heads(heads, val)) == pytest.approx(chosen)
    assert result["val_mean_recall"] == pytest.approx(max(mix["val_by_alpha"].values()))


def test_interpolation_falls_back_toward_the_pretrained_heads_when_training_did_harm(synthetic_cache, tmp_path):
    """From heads that work, trained heads that do harm: the chosen mix does not, and sits near alpha 0."""
    c = cache.load(synthetic_cache)
    probe.train(c, FAST, tmp_path / "good.pt", log=io.StringIO())
    val, init = c.split("val"), probe.load_checkpoint(tmp_path / "good.pt")[0]  # a start that has learned
    zero_shot = metrics.mean_recall(probe.evaluate_heads(init, val))
    gen = torch.Generator().manual_seed(0)
    harmful = probe.Heads(torch.randn(init.visual_proj.shape, generator=gen),
                          torch.randn(init.text_projection.shape, generator=gen), init.logit_scale)
    heads, mix, chosen = probe.interpolate(init, harmful, val, probe.ProbeSettings().alphas)
    assert mix["val_by_alpha"]["1.0"] < zero_shot - 20  # the trained heads really did harm
    assert metrics.mean_recall(chosen) >= zero_shot and mix["alpha"] <= 0.5
    assert torch.allclose(heads.visual_proj, init.mix(harmful, mix["alpha"]).visual_proj)


def test_interpolation_can_be_turned_off(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    off = probe.train(c, probe.ProbeSettings(**{**FAST.__dict__, "interpolate": False}), tmp_path / "q.pt",
                      log=io.StringIO())
    assert off["interpolation"] is None and probe.load_checkpoint(tmp_path / "q.pt")[1]["interpolation"] is None


def test_mix_ends_are_exactly_the_two_heads():
    a = probe.Heads(torch.randn(6, 4), torch.randn(5, 4), torch.tensor(2.0))
    b = probe.Heads(torch.randn(6, 4), torch.randn(5, 4), torch.tensor(3.0))
    assert torch.equal(a.mix(b, 0.0).visual_proj, a.visual_proj)
    assert torch.equal(a.mix(b, 1.0).text_projection, b.text_projection)
    assert torch.allclose(a.mix(b, 0.25).visual_proj, 0.75 * a.visual_proj + 0.25 * b.visual_proj)


@pytest.mark.parametrize("alphas, message", [((), "non-empty"), ((0.0, 1.5), "in \\[0, 1\\]"),
                                             ((-0.1,), "in \\[0, 1\\]")])
def test_bad_alpha_grids_are_refused(alphas, message):
    with pytest.raises(probe.ProbeError, match=message):
        probe.ProbeSettings(alphas=alphas).check()


def test_cli_refuses_bad_alpha_grids(synthetic_cache):
    for bad in ("", "0,2", "a,b"):
        r = CliRunner().invoke(cli.cli, ["probe", "--cache", str(synthetic_cache), "--alphas", bad])
        assert r.exit_code == 2 and "--alphas" in r.output, r.output


def test_a_checkpoint_from_before_interpolation_loads_as_alpha_one(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    probe.train(c, FAST, tmp_path / "new.pt", log=io.StringIO())
    old = torch.load(tmp_path / "new.pt", weights_only=True)
    del old["interpolation"]
    torch.save(old, tmp_path / "old.pt")
    log = io.StringIO()
    heads, ckpt = probe.load_checkpoint(tmp_path / "old.pt", c, log=log)
    assert ckpt["interpolation"]["alpha"] == 1.0
    assert "saved before interpolation existed" in log.getvalue()
    assert torch.equal(heads.visual_proj, old["visual_proj"])


def naive_multi_positive(img, txt, owner, scale):
    """Loop form: each image's target spreads evenly over its own captions; each caption has one image."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = scale * img @ txt.T
    i2t = 0.0
    for i in range(len(img)):
        mine = [j for j in range(len(txt)) if owner[j] == i]
        logp = torch.log_softmax(logits[i], 0)
        i2t += -sum(logp[j] for j in mine) / len(mine)
    t2i = sum(-torch.log_softmax(logits[:, j], 0)[owner[j]] for j in range(len(txt)))
    return (i2t / len(img) + t2i / len(txt)) / 2


def test_multi_positive_loss_matches_its_loop_form():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(4, 8, generator=gen), torch.randn(11, 8, generator=gen)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3, 2])
    got = probe.multi_positive_loss(img, txt, owner, torch.tensor(2.0))
    assert float(got) == pytest.approx(float(naive_multi_positive(img, txt, owner, math.exp(2.0))), rel=1e-5)


def test_every_caption_of_each_batch_image_is_a_positive():
    idx = torch.tensor([2, 0, 1, 0, 2, 2, 1]).numpy()
    sampler = probe.CaptionSampler(idx, 3)
    caps, owner = sampler.every(torch.tensor([2, 0]))
    assert sorted(caps[owner == 0].tolist()) == [0, 4, 5] and sorted(caps[owner == 1].tolist()) == [1, 3]


def test_multi_positive_training_learns(synthetic_cache, tmp_path):
    c = cache.load(synthetic_cache)
    zero_shot = metrics.mean_recall(probe.evaluate_heads(probe.Heads.from_cache(c), c.split("val")))
    result = probe.train(c, probe.ProbeSettings(**{**FAST.__dict__, "loss": "multi"}), tmp_path / "m.pt",
                         log=io.StringIO())
    assert result["val_mean_recall"] > zero_shot + 20


def test_eval_before_any_probe_reports_zero_shot(synthetic_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no checkpoints/linearprobe_best.pt here
    r = CliRunner().invoke(cli.cli, ["eval", "--cache", str(synthetic_cache), "--split", "test"])
    assert r.exit_code == 0, r.output
    assert "no probe checkpoint" in r.output and "zero-shot" in r.output
    result = json.loads((tmp_path / "artifacts/final_evaluation_results.json").read_text())
    assert "baseline" in result and "probe" not in result
    named = CliRunner().invoke(cli.cli, ["eval", "--cache", str(synthetic_cache), "--checkpoint", "missing.pt"])
    assert named.exit_code == 1 and "checkpoint not found: missing.pt" in named.output
