import pytest
import torch

from pipeline.models import build_model
from pipeline.models.pixelcnn import GatedPixelCNN
from pipeline.models.vqvae import VQVAE, VectorQuantizerEMA


@pytest.mark.parametrize("k, d, hidden, blocks", [(128, 16, 32, 2), (16, 4, 8, 0), (512, 8, 16, 1)])
def test_vqvae_shapes(k, d, hidden, blocks):
    m = VQVAE(num_embeddings=k, embedding_dim=d, hidden_channels=hidden, res_channels=8, num_res_blocks=blocks)
    x = torch.rand(3, 1, 28, 28)
    xh, vq = m(x)
    assert xh.shape == (3, 1, 28, 28) and xh.min() >= 0 and xh.max() <= 1
    assert vq.quantized.shape == (3, d, 7, 7) and vq.codes.shape == (3, 7, 7) and vq.codes.dtype == torch.long
    assert int(vq.codes.max()) < k and 1.0 <= float(vq.perplexity) <= k
    codes = m.index_quantize(x)
    assert m.decode_codes(codes).shape == (3, 1, 28, 28)


def test_straight_through_gradient_passes_unchanged():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(8, 4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    # forward value is the codebook vector of the chosen code
    expect = q.embedding[out.codes.flatten()].view(2, 3, 3, 4).permute(0, 3, 1, 2)
    assert torch.allclose(out.quantized, expect)
    w = torch.randn_like(z)
    (out.quantized * w).sum().backward()
    assert torch.equal(z.grad, w)  # d quantized / d z_e = identity


def test_commitment_loss_value_and_gradient():
    q = VectorQuantizerEMA(2, 1, commitment_cost=0.25).eval()
    q.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    z = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3).requires_grad_()
    out = q(z)
    # (1-0)^2 + (2-0)^2 + (9-10)^2 = 6, mean over 3 -> 2, times beta
    assert float(out.commitment_loss.detach()) == pytest.approx(0.25 * 2.0)
    out.commitment_loss.backward()
    assert torch.allclose(z.grad.flatten(), 0.25 * 2 * torch.tensor([1.0, 2.0, -1.0]) / 3)


def test_ema_codebook_update_matches_hand_computation():
    q = VectorQuantizerEMA(2, 1, decay=0.5, dead_code_threshold=0.0, eps=1e-12).train()
    q.embedding.copy_(torch.tensor([[0.0], [10.0]]))
    q.embed_sum.copy_(q.embedding)
    q.cluster_size.fill_(1.0)
    out = q(torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3))
    assert out.codes.flatten().tolist() == [0, 0, 1]
    # N = 0.5*1 + 0.5*[2, 1] = [1.5, 1.0]; m = 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5]; e = m / N
    assert torch.allclose(q.cluster_size, torch.tensor([1.5, 1.0]))
    assert torch.allclose(q.embed_sum.flatten(), torch.tensor([1.5, 9.5]))
    assert torch.allclose(q.embedding.flatten(), torch.tensor([1.0, 9.5]), atol=1e-6)
    # the output of this batch used the codebook before the update
    assert out.quantized.flatten().tolist() == [0.0, 0.0, 10.0]


def test_dead_codes_restart_from_encoder_outputs():
    torch.manual_seed(0)
    q = VectorQuantizerEMA(4, 2, decay=0.5, dead_code_threshold=0.6).train()
    q.embedding.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    z = torch.randn(1, 2, 4, 4) * 0.1 + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    q(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert int(q.restarts) == 3
    for row in q.embedding[1:]:
        assert (flat - row).abs().sum(1).min() < 1e-6  # each restarted code is an encoder output
    assert torch.allclose(q.cluster_size[1:], torch.ones(3))


@pytest.mark.parametrize("kernel, layers", [(3, 1), (3, 4), (5, 3)])
def test_pixelcnn_is_causal_and_has_no_blind_spot(kernel, layers):
    torch.manual_seed(0)
    m = GatedPixelCNN(num_embeddings=10, hidden_channels=8, num_layers=layers, kernel_size=kernel).double()
    h = w = 7
    for i, j in [(0, 0), (3, 3), (3, 0), (6, 6), (2, 5)]:
        x = torch.randn(1, 8, h, w, dtype=torch.double, requires_grad=True)
        m.forward_embedded(x)[0, :, i, j].sum().backward()
        g = x.grad.abs().sum(1)[0]
        for a in range(h):
            for b in range(w):
                if (a, b) >= (i, j):  # the position itself and everything after it in raster order
                    assert g[a, b] == 0, f"logits at {(i, j)} depend on input at {(a, b)}"
        if j > 0:
            assert g[i, j - 1] > 0, "left neighbour must be seen"
        if i > 0:
            assert g[i - 1, j] > 0, "pixel above must be seen"
            if j + 1 < w:
                assert g[i - 1, j + 1] > 0, "blind spot: above-right pixel is not seen"


@pytest.mark.parametrize("num_classes", [0, 10])
def test_3d_pixelcnn_is_causal_in_raster_order_and_sees_everything_before(num_classes):
    """spatial_dims 3 (code grids of volumes): the logits at (p, i, j) depend on exactly the
    codes before (p, i, j) in raster order over planes, rows and columns (no blind spot at the
    last position with enough layers), and on the planes <= p only, so the sampler may crop."""
    torch.manual_seed(0)
    m = GatedPixelCNN(num_embeddings=8, hidden_channels=8, num_layers=4, num_classes=num_classes, spatial_dims=3)
    m = m.double().eval()
    d, h, w = 3, 4, 5
    order = torch.arange(d * h * w).view(d, h, w)
    y = torch.tensor([3]) if num_classes else None
    for pos in [(0, 0, 1), (1, 2, 3), (2, 0, 0), (2, 3, 4)]:
        x = torch.randn(1, 8, d, h, w, dtype=torch.double, requires_grad=True)
        m.forward_embedded(x, y)[(0, slice(None), *pos)].sum().backward()
        seen = x.grad.abs().sum(1)[0] > 0
        assert not seen[order >= order[pos]].any(), f"logits at {pos} see the future"
    assert seen[order < order[pos]].all(), "the last position must see every earlier code"
    codes = torch.randint(0, 8, (2, d, h, w))
    full = m(codes, y if y is None else y.expand(2))
    for p in range(d):
        assert torch.allclose(m(codes[:, : p + 1], y if y is None else y.expand(2))[:, :, p], full[:, :, p])


def test_pixelcnn_shapes_and_mask_types():
    m = GatedPixelCNN(num_embeddings=32, hidden_channels=8, num_layers=3)
    assert [layer.mask_type for layer in m.layers] == ["A", "B", "B"]
    codes = torch.randint(0, 32, (4, 7, 7))
    assert m(codes).shape == (4, 32, 7, 7)


@pytest.mark.parametrize("size", [7, 8, 5, 12])
@pytest.mark.parametrize("mult, attention", [((1, 2), True), ((1, 2, 2), True), ((1,), False)])
def test_unet_maps_any_size_to_itself(size, mult, attention):
    m = build_model("unet", {"in_channels": 4, "base_channels": 8, "channel_mult": list(mult), "attention": attention})
    x = torch.randn(2, 4, size, size)
    out = m(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output convolution


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model kind 'gan'"):
        build_model("gan", {})
    with pytest.raises(ValueError, match="cannot build 'unet'"):
        build_model("unet", {"widht": 3})


def test_ema_warmup_and_decay():
    from torch.optim.swa_utils import AveragedModel

    from pipeline.training import ema_avg_fn

    net = torch.nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(0.0)
    ema = AveragedModel(net, avg_fn=ema_avg_fn(0.9))  # first update copies the weights
    ema.update_parameters(net)
    net.weight.data.fill_(1.0)
    ema.update_parameters(net)  # n = 1: d = min(0.9, 2 / 11)
    assert float(ema.module.weight.detach()) == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update_parameters(net)
    net.weight.data.fill_(2.0)
    before = float(ema.module.weight.detach())
    ema.update_parameters(net)  # warm-up over: d = 0.9
    assert float(ema.module.weight.detach()) == pytest.approx(0.9 * before + 0.1 * 2.0)


@pytest.mark.parametrize("num_classes", [0, 10])
def test_pixelcnn_rows_are_causal_so_sampling_may_crop_the_grid(num_classes):
    """The logits of row i depend on rows <= i only (masked convolutions, type A then B): the
    sampler feeds rows 0..i, which must give the full grid's logits exactly."""
    from pipeline.models.pixelcnn import GatedPixelCNN

    torch.manual_seed(0)
    m = GatedPixelCNN(128, 16, 3, 3, num_classes=num_classes).eval()
    x = torch.randint(0, 128, (4, 7, 7))
    y = torch.randint(0, 10, (4,)) if num_classes else None
    full = m(x, y)
    for i in range(7):
        assert torch.equal(m(x[:, : i + 1], y)[:, :, i], full[:, :, i])
    changed = x.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 128  # rows below 3 do not reach row 3
    assert torch.equal(m(changed, y)[:, :, :4], full[:, :, :4]) and not torch.equal(
        m(changed, y)[:, :, 4], full[:, :, 4]
    )


@pytest.mark.parametrize("kind", ["vqvae", "unet", "pixelcnn", "pixelcnn3d"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """Recomputing activations in backward (``<section>.gradient_checkpointing``) changes memory,
    not the maths: the same loss and bit-identical gradients, dropout included."""
    from pipeline.config import load_default
    from pipeline.models import build_model, model_args

    cfg = load_default()
    torch.manual_seed(0)
    if kind == "vqvae":
        net = build_model("vqvae", model_args("vqvae", cfg["vqvae"], spatial_dims=3))
        inputs = (torch.rand(2, 1, 16, 16, 8),)
    elif kind == "unet":
        net = build_model("unet", model_args("unet", {**cfg["diffusion"], "dropout": 0.1}, in_channels=8))
        inputs = (torch.randn(2, 8, 7, 7), torch.randint(0, 100, (2,)))
    else:
        sd = 3 if kind == "pixelcnn3d" else 2
        net = build_model(
            "pixelcnn", model_args("pixelcnn", {**cfg["pixelcnn"], "dropout": 0.1}, in_channels=16, spatial_dims=sd)
        )
        inputs = (torch.randint(0, 16, (2, 4, 4, 2) if sd == 3 else (2, 7, 7)),)
    net.train()
    if kind == "vqvae":
        net.quantizer.eval()  # the EMA codebook update is state, not activations: keep it fixed
    grads, losses = [], []
    for on in (False, True):
        net.enable_gradient_checkpointing(on)
        net.zero_grad()
        torch.manual_seed(1)
        out = net(*inputs)
        loss = (out[0] if isinstance(out, tuple) else out).float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert losses[0] == losses[1] and len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    assert len(net.checkpoint_regions()) > 0
