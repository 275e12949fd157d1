"""Class conditioning and classifier-free guidance (Ho & Salimans 2022)."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion import autoguidance, classifier_free_guidance, guidance_combine
from pipeline.models import GatedPixelCNN, UNet
from pipeline.sample import sample_pixelcnn
from pipeline.training import drop_labels


@pytest.fixture
def unet():
    torch.manual_seed(0)
    net = UNet(in_channels=4, base_channels=8, channel_mult=[1, 2], num_classes=10).eval()
    for p in net.parameters():  # the output conv starts at zero: make the prediction depend on everything
        torch.nn.init.normal_(p, std=0.2)
    return net


def test_guidance_at_the_no_guidance_setting_is_the_conditional_prediction(unet):
    x, t, y = torch.randn(6, 4, 7, 7), torch.randint(0, 1000, (6,)), torch.arange(6)
    with torch.no_grad():
        cond = unet(x, t, y)
        guided = classifier_free_guidance(unet, y, 1.0, null_label=10, batched=True)(x, t)  # the 2B batched path
        plain = classifier_free_guidance(unet, y, 1.0, null_label=10)(x, t)  # the one-pass shortcut
    torch.testing.assert_close(guided, cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, cond)


def test_guidance_at_the_unconditional_setting_is_the_unconditional_prediction(unet):
    x, t, y = torch.randn(6, 4, 7, 7), torch.randint(0, 1000, (6,)), torch.arange(6)
    with torch.no_grad():
        uncond = unet(x, t, torch.full((6,), 10))
        guided = classifier_free_guidance(unet, y, 0.0, null_label=10)(x, t)
    torch.testing.assert_close(guided, uncond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet(x, t), uncond)  # no labels = the null label


def test_guidance_extrapolates_and_the_two_conventions_agree(unet):
    x, t, y = torch.randn(4, 4, 7, 7), torch.randint(0, 1000, (4,)), torch.tensor([1, 3, 5, 7])
    with torch.no_grad():
        cond, uncond = unet(x, t, y), unet(x, t)
        guided = classifier_free_guidance(unet, y, 3.0, null_label=10)(x, t)
    w = 2.0  # Ho & Salimans: (1 + w) eps(z, c) - w eps(z) with w = s - 1
    torch.testing.assert_close(guided, (1 + w) * cond - w * uncond, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cond, uncond)  # the label matters
    with pytest.raises(ValueError, match="guidance scale"):
        classifier_free_guidance(unet, y, -1.0, null_label=10)


def test_labels_are_checked():
    net = UNet(in_channels=2, base_channels=8, channel_mult=[1])
    with pytest.raises(ValueError, match="unconditional UNet"):
        net(torch.randn(2, 2, 7, 7), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    cnet = UNet(in_channels=2, base_channels=8, channel_mult=[1], num_classes=10)
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        cnet(torch.randn(2, 2, 7, 7), torch.zeros(2), torch.tensor([0, 11]))


def test_conditional_pixelcnn_stays_causal_and_uses_the_label():
    torch.manual_seed(0)
    net = GatedPixelCNN(num_embeddings=16, hidden_channels=8, num_layers=3, num_classes=10).eval()
    codes = torch.randint(0, 16, (2, 7, 7))
    x = net.embedding(codes).permute(0, 3, 1, 2).detach().requires_grad_(True)
    y = torch.tensor([3, 4])
    logits = net.forward_embedded(x, y)
    i, j = 3, 4
    logits[:, :, i, j].sum().backward()
    grad = x.grad.abs().sum(dim=(0, 1))
    # nothing at or after (i, j) in raster order influences the logits at (i, j)
    future = torch.zeros(7, 7, dtype=torch.bool)
    future[i, j:] = True
    future[i + 1 :] = True
    assert grad[future].sum() == 0 and grad[~future].sum() > 0
    with torch.no_grad():
        assert not torch.allclose(net(codes, torch.tensor([0, 0])), net(codes, torch.tensor([9, 9])))


def test_pixelcnn_guidance_at_no_guidance_equals_conditional_sampling():
    torch.manual_seed(0)
    net = GatedPixelCNN(num_embeddings=16, hidden_channels=8, num_layers=2, num_classes=10).eval()
    y = torch.arange(6) % 10
    a = sample_pixelcnn(net, 6, labels=y, guidance=1.0, generator=torch.Generator().manual_seed(0))
    b = sample_pixelcnn(
        net, 6, labels=y, guidance=1.0 + 1e-12, generator=torch.Generator().manual_seed(0)
    )  # batched path
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="needs labels"):
        sample_pixelcnn(net, 2, guidance=2.0)


def test_guidance_combine_endpoints():
    c, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(guidance_combine(c, u, 1.0), c)
    torch.testing.assert_close(guidance_combine(c, u, 0.0), u)


def test_label_dropout_rate():
    torch.manual_seed(0)
    y = torch.zeros(100_000, dtype=torch.long)
    dropped = drop_labels(y, 0.1, 10)
    assert abs(float((dropped == 10).float().mean()) - 0.1) < 0.005
    assert set(dropped.unique().tolist()) == {0, 10}
    assert torch.equal(drop_labels(y, 0.0, 10), y)


def test_autoguidance_interpolates_and_extrapolates_the_two_networks(unet):
    """Karras et al. 2024 eq. 2: D_weak + w (D - D_weak); w = 1 is the model, w = 0 the weak one."""
    torch.manual_seed(1)
    weak = UNet(in_channels=4, base_channels=8, channel_mult=[1, 2], num_classes=10).eval()
    for p in weak.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 4, 7, 7), torch.randint(0, 1000, (3,))
    with torch.no_grad():
        good, bad = unet(x, t), weak(x, t)
        torch.testing.assert_close(autoguidance(unet, weak, 1.0)(x, t), good)
        torch.testing.assert_close(autoguidance(unet, weak, 0.0)(x, t), bad)
        torch.testing.assert_close(autoguidance(unet, weak, 2.5)(x, t), bad + 2.5 * (good - bad), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="autoguidance weight must be >= 0"):
        autoguidance(unet, weak, -0.5)


def test_pixelcnn_autoguidance_by_itself_changes_nothing_and_by_another_model_does():
    torch.manual_seed(0)
    net = GatedPixelCNN(num_embeddings=6, hidden_channels=8, num_layers=2).eval()
    other = GatedPixelCNN(num_embeddings=6, hidden_channels=8, num_layers=2).eval()
    plain = sample_pixelcnn(net, 16, shape=(3, 3), generator=torch.Generator().manual_seed(5))
    same = sample_pixelcnn(
        net, 16, shape=(3, 3), generator=torch.Generator().manual_seed(5), guide=net, autoguidance=3.0
    )
    assert torch.equal(plain, same)  # l + w (l - l) = l
    guided = sample_pixelcnn(
        net, 16, shape=(3, 3), generator=torch.Generator().manual_seed(5), guide=other, autoguidance=3.0
    )
    assert not torch.equal(plain, guided)
    with pytest.raises(ValueError, match="autoguidance needs the guide"):
        sample_pixelcnn(net, 2, shape=(2, 2), autoguidance=2.0)


def test_snapshot_is_taken_at_its_step_and_stored(tiny_run):
    """The stage keeps the EMA weights after guide_fraction * steps: at the last step they are the
    final EMA weights; earlier they differ."""
    from pipeline.checkpoint import load_model
    from pipeline.training import guide_step

    state = torch.load(tiny_run / "diffusion" / "model.pt", weights_only=True)
    assert (
        state["guide"] is not None
        and state["metrics"]["guide_step"] == guide_step({"steps": 20, "guide_fraction": 0.25}) == 5
    )
    assert any(not torch.equal(state["guide"][k], state["ema"][k]) for k in state["ema"])
    weak, _ = load_model(tiny_run / "diffusion" / "model.pt", weights="guide")
    assert all(torch.equal(weak.state_dict()[k], state["guide"][k]) for k in state["guide"])
    assert (
        guide_step({"steps": 20, "guide_fraction": 1.0}) == 20
        and guide_step({"steps": 20, "guide_fraction": 0}) is None
    )
    assert guide_step({"steps": 3, "guide_fraction": 0.01}) == 1


def test_snapshot_at_the_last_step_is_the_final_ema(tiny_run, tiny_cfg, tmp_path):
    import shutil

    from pipeline.stages import get_stage

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run)
    cfg = {**tiny_cfg, "diffusion": {**tiny_cfg["diffusion"], "guide_fraction": 1.0}}
    get_stage("train_diffusion")(cfg, str(run), threads=1)
    state = torch.load(run / "diffusion" / "model.pt", weights_only=True)
    assert all(torch.equal(state["guide"][k], state["ema"][k]) for k in state["ema"])
