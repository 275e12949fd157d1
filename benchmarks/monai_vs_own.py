"""Own networks or MONAI's? The VQ-VAE and the latent U-Net on the 2D default (issue #14, item 2).

    python benchmarks/monai_vs_own.py [--seconds 85] [--threads 2]

Trains the project's VQ-VAE (``pipeline.models.VQVAE``, the default config: hidden 64, widths 32
and 64, 2 residual blocks of width 32, K = 128, D = 16, f = 4, EMA codebook 0.99 with dead-code
restarts) and MONAI's ``monai.networks.nets.VQVAE`` at the same sizes (channels (32, 64), 2
residual layers of 32, K = 128, D = 16, two stride-2 4x4 stages, EMA decay 0.99, commitment 0.25,
sigmoid output; MONAI has no dead-code restart) on the 4,500 MNIST-5k train digits for the same
wall time, same seed, batch 128, Adam lr 1e-3, and prints per network: parameters, seconds per
step, steps done, test reconstruction MSE, codes in use and perplexity on the 500 test digits.

For the latent U-Net it prints parameters and the seconds per training step (forward + backward
of the v-prediction loss on a (64, 16, 7, 7) batch, padded to 8 x 8 for MONAI) of the project's
``UNet`` (base 48, mult (1, 2), attention at 4 x 4) and MONAI's ``DiffusionModelUNet`` at the same
widths and levels. FD / floor of a full prior at equal wall time needs the whole chain per network
and is not measured here. Every figure is measured on this machine; nothing is assumed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn.functional as F

from pipeline.config import load_default
from pipeline.data import prepare_data, read_dataset
from pipeline.models import build_model, model_args


def own_vqvae(cfg):
    return build_model("vqvae", model_args("vqvae", cfg["vqvae"], in_channels=1))


def monai_vqvae():
    from monai.networks.nets import VQVAE

    return VQVAE(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(32, 64),
        num_res_layers=2,
        num_res_channels=32,
        downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
        upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
        num_embeddings=128,
        embedding_dim=16,
        decay=0.99,
        commitment_cost=0.25,
        output_act="sigmoid",
    )


def train_for(net, kind: str, x: torch.Tensor, seconds: float, seed: int = 0) -> tuple[int, float]:
    """Adam steps on random batches of 128 for ``seconds`` of wall time; (steps, s/step)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = x[torch.randint(0, len(x), (128,), generator=g)]
        if kind == "own":
            xh, vq = net(b)
            loss = F.mse_loss(xh, b) + vq.commitment_loss
        else:
            xh, q_loss = net(b)
            loss = F.mse_loss(xh, b) + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    return steps, (time.perf_counter() - t0) / max(steps, 1)


@torch.no_grad()
def test_scores(net, kind: str, x: torch.Tensor) -> dict:
    net.eval()
    if kind == "own":
        xh, codes = net(x)[0], net.index_quantize(x)
    else:
        xh, codes = net(x)[0], net.index_quantize(x)
    counts = torch.bincount(codes.flatten(), minlength=128).double()
    p = counts / counts.sum()
    return {
        "test_mse": float(F.mse_loss(xh, x)),
        "codes_in_use": int((counts > 0).sum()),
        "perplexity": float(torch.exp(torch.special.entr(p).sum())),
    }


def unet_step_time(net, x: torch.Tensor, reps: int = 20) -> float:
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    t = torch.randint(0, 1000, (len(x),))

    def step():
        loss = F.mse_loss(net(x, t), torch.randn_like(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - t0) / reps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=85.0, help="wall time per VQ-VAE (the default's 1000 steps)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_default()
    with tempfile.TemporaryDirectory() as tmp:
        prepare_data(cfg, tmp)
        train_x = read_dataset(f"{tmp}/data/dataset.h5", "train").unit()
        test_x = read_dataset(f"{tmp}/data/dataset.h5", "test").unit()
    print("VQ-VAE, MNIST-5k, equal wall time", a.seconds, "s,", a.threads, "threads")
    print("network\tparameters\ts/step\tsteps\ttest MSE\tcodes in use\tperplexity")
    for kind, make in (("own", lambda: own_vqvae(cfg)), ("monai", monai_vqvae)):
        torch.manual_seed(0)
        net = make()
        steps, sps = train_for(net, kind, train_x, a.seconds)
        s = test_scores(net, kind, test_x)
        n_par = sum(q.numel() for q in net.parameters())
        print(f"{kind}\t{n_par}\t{sps:.4f}\t{steps}\t{s['test_mse']:.5f}\t{s['codes_in_use']}\t{s['perplexity']:.1f}")
    from monai.networks.nets import DiffusionModelUNet

    sec = cfg["diffusion"]
    own = build_model("unet", model_args("unet", sec, in_channels=16))
    base = int(sec["base_channels"])
    monai = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=16,
        out_channels=16,
        num_res_blocks=int(sec["num_res_blocks"]),
        channels=tuple(base * m for m in sec["channel_mult"]),
        attention_levels=(False, True),
        norm_num_groups=16,
        num_head_channels=base * sec["channel_mult"][-1] // 4,
    )
    print("latent U-Net, batch 64 of 16 x 7 x 7 (MONAI: padded to 8 x 8)")
    print("network\tparameters\ts/step")
    for kind, net, x in (
        ("own", own, torch.randn(64, 16, 7, 7)),
        ("monai", monai, torch.randn(64, 16, 8, 8)),
    ):
        print(f"{kind}\t{sum(q.numel() for q in net.parameters())}\t{unet_step_time(net, x):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
