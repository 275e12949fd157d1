"""bf16 autocast on the CPU (issue #21): the path both GPU presets switch on, run where the tests
run. The parts that decide or accumulate stay float32 (pipeline/precision.py): the nearest code,
the codebook's EMA statistics, the PixelCNN's logits, the evaluation; the tiny chain runs end to
end in bf16 with its VQ-VAE as good as in float32."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import deep_merge
from pipeline.models import build_model
from pipeline.models.vqvae import VectorQuantizerEMA
from pipeline.precision import bf16_autocast, float32, full, run_float32
from pipeline.runtime import autocast


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_bf16_true_means_cpu_autocast_too():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), True):
        assert (a @ b).dtype == torch.bfloat16
        with float32(a):  # a float32 region inside it
            assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), False):
        assert (a @ b).dtype == torch.float32
    assert full(torch.ones(2, dtype=torch.bfloat16)).dtype == torch.float32
    assert full(torch.ones(2, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="bf16 autocast needs a cuda or cpu device, got 'meta'"):
        bf16_autocast("meta", True)


def _near_ties(k: int = 128, d: int = 16, n: int = 4000, seed: int = 0):
    """A trained-looking codebook (codes with a common offset, as EMA codebooks have) and encoder
    outputs near it: the regime where bf16's |x|^2 - 2x.e + |e|^2 picks wrong codes."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(k, d, generator=g) * 0.3 + 2.0
    flat = emb[torch.randint(0, k, (n,), generator=g)] + torch.randn(n, d, generator=g) * 0.25
    return emb, flat


def test_nearest_code_under_autocast_equals_the_float32_one():
    emb, flat = _near_ties()
    vq = VectorQuantizerEMA(128, 16)
    vq.embedding.copy_(emb)
    want = vq.nearest(flat)
    assert torch.equal(want, torch.cdist(flat.double(), emb.double()).argmin(1))  # the true nearest
    with bf16():
        got = vq.nearest(flat)
        naive = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None]).argmin(1)
    assert torch.equal(got, want)
    assert (naive != want).float().mean() > 0.05  # what the expansion gives in bf16: the test can fail


def test_quantizer_forward_under_autocast_keeps_codes_and_ema_statistics():
    emb, flat = _near_ties(n=2048)
    z_e = flat.view(8, 16, 16, 16).permute(0, 3, 1, 2).contiguous()  # (B, D, H, W)
    outs = {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        vq = VectorQuantizerEMA(128, 16).train()
        vq.embedding.copy_(emb)
        vq.embed_sum.copy_(emb)
        with bf16_autocast("cpu", name == "bf16"):
            out = vq(z_e)
        outs[name] = (out, {k: v.clone() for k, v in vq.state_dict().items()})
    (o32, s32), (ob, sb) = outs["fp32"], outs["bf16"]
    assert torch.equal(o32.codes, ob.codes)
    for key in ("embedding", "cluster_size", "embed_sum"):
        assert sb[key].dtype == torch.float32 and torch.equal(s32[key], sb[key]), key
    assert ob.quantized.dtype == torch.float32 and torch.equal(o32.quantized, ob.quantized)
    assert torch.equal(o32.commitment_loss, ob.commitment_loss) and torch.equal(o32.perplexity, ob.perplexity)


def test_pixelcnn_logits_come_from_a_float32_output_layer():
    torch.manual_seed(0)
    net = build_model("pixelcnn", {"num_embeddings": 16, "hidden_channels": 16, "num_layers": 2}).eval()
    codes = torch.randint(0, 16, (4, 7, 7))
    with torch.no_grad(), bf16():
        logits = net(codes)
        x = net.embedding(codes).movedim(-1, 1)
        v, h = x, x
        for layer in net.layers:
            v, h = layer(v, h, None)
        hidden = net.head[:-1](h)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        want = net.head[-1](hidden.float())  # the last 1x1 convolution in float32, outside autocast
        assert torch.equal(run_float32(net.head[-1], hidden), want)
    assert torch.equal(logits, want)


# --- the tiny chain in bf16 -------------------------------------------------------------------
BF16_SETS = ["pixelcnn", "pixelcnn_ag2", "diffusion_ddim", "diffusion_dpmsde_ag2"]


#: a VQ-VAE that learns its codebook in the test's budget (the tiny config's 20 steps use one
#: code): 600 steps at width 32, a few seconds; at 300 steps one training's spread is above 5 %
VQ_LEARNS = {"vqvae": {"hidden_channels": 32, "steps": 600, "log_every": 100, "checkpoint_every": 300}}


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, tiny_cfg):
    """The tiny chain with bf16: true (and the same VQ-VAE trained in float32 beside it)."""
    import shutil

    from pipeline.stages import get_stage

    cfg = deep_merge(tiny_cfg, {"bf16": True, "sample": {"sets": BF16_SETS}, **VQ_LEARNS})
    root = tmp_path_factory.mktemp("bf16")
    run, ref = root / "tiny", root / "fp32"
    get_stage("prepare_data")(cfg, str(run), threads=2)
    shutil.copytree(run / "data", ref / "data")
    get_stage("train_vqvae")(deep_merge(cfg, {"bf16": False}), str(ref), threads=2)
    for stage in ("train_vqvae", "extract_latents", "train_classifier", "train_pixelcnn", "train_diffusion"):
        get_stage(stage)(cfg, str(run), threads=2)
    get_stage("sample")(cfg, str(run), sample_sets=BF16_SETS, threads=2)
    get_stage("evaluate")(cfg, str(run), threads=2)
    return cfg, run, ref


def _losses(path):
    with open(path) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_tiny_chain_trains_and_samples_in_bf16(bf16_run):
    cfg, run, ref_run = bf16_run
    vq = json.loads((run / "vqvae" / "metrics.json").read_text())
    ref = json.loads((ref_run / "vqvae" / "metrics.json").read_text())
    assert vq["where"]["bf16"] is True and ref["where"]["bf16"] is False
    assert vq["test_codes_in_use"] >= 0.9 * cfg["vqvae"]["num_embeddings"]  # the codebook in use
    assert abs(vq["test_recon_mse"] / ref["test_recon_mse"] - 1) < 0.05, (vq["test_recon_mse"], ref["test_recon_mse"])
    for stage in ("vqvae", "pixelcnn", "diffusion"):
        losses = _losses(run / stage / "train_log.csv")
        assert losses and all(math.isfinite(v) for v in losses), stage
        assert losses[-1] < losses[0], stage  # both priors (and the VQ-VAE) train
    for name in BF16_SETS:
        arr = np.load(run / "samples" / f"{name}.npy")
        assert arr.shape == (cfg["sample"]["num_samples"], 1, 28, 28) and np.isfinite(arr).all(), name
        assert 0 <= arr.min() and arr.max() <= 1 and arr.std() > 0.01, name


def test_the_judge_and_the_evaluation_stay_float32(bf16_run, tiny_run):
    """The classifier trains in float32 whatever bf16 says (the same weights as in the float32
    run), and evaluate never autocasts: bf16 on or off, the same report."""
    from pipeline.checkpoint import load
    from pipeline.stages import get_stage

    cfg, run, _ = bf16_run
    ours, theirs = load(run / "classifier" / "model.pt"), load(tiny_run / "classifier" / "model.pt")
    assert all(torch.equal(ours["model"][k], theirs["model"][k]) for k in ours["model"])
    before = json.loads((run / "report" / "metrics.json").read_text())
    get_stage("evaluate")(deep_merge(cfg, {"bf16": False}), str(run), threads=2)
    after = json.loads((run / "report" / "metrics.json").read_text())
    for name in BF16_SETS:
        assert before["sets"][name]["fd_train"] == after["sets"][name]["fd_train"], name
