"""Print training and sampling throughput of the default models on this machine.

    python benchmarks/throughput.py [--threads 2] [--device auto]

Figures (steps/s, images/s) are what the default config's budget was chosen from; compare them
across machines before changing step counts. Uses random inputs of the real shapes: it measures
speed, not quality.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.config import load_default
from pipeline.diffusion import GaussianDiffusion
from pipeline.models import build_model
from pipeline.runtime import resolve_device


def rate(fn, n: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    cfg = load_default()
    v, p, d = cfg["vqvae"], cfg["pixelcnn"], cfg["diffusion"]

    vq = build_model(
        "vqvae",
        {k: v[k] for k in ("num_embeddings", "embedding_dim", "hidden_channels", "res_channels", "num_res_blocks")},
    ).to(dev)
    opt = torch.optim.Adam(vq.parameters())
    x = torch.rand(v["batch_size"], 1, 28, 28, device=dev)

    def vq_step():
        xh, out = vq(x)
        loss = F.mse_loss(xh, x) + out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    r = rate(vq_step, 20)
    print(f"train_vqvae      {r:8.1f} steps/s  (batch {v['batch_size']}; {v['steps']} steps = {v['steps'] / r:6.0f} s)")

    pc = build_model(
        "pixelcnn",
        {
            "num_embeddings": v["num_embeddings"],
            "hidden_channels": p["hidden_channels"],
            "num_layers": p["num_layers"],
            "kernel_size": p["kernel_size"],
        },
    ).to(dev)
    opt = torch.optim.Adam(pc.parameters())
    c = torch.randint(0, v["num_embeddings"], (p["batch_size"], 7, 7), device=dev)

    def pc_step():
        loss = F.cross_entropy(pc(c), c)
        opt.zero_grad()
        loss.backward()
        opt.step()

    r = rate(pc_step, 20)
    print(f"train_pixelcnn   {r:8.1f} steps/s  (batch {p['batch_size']}; {p['steps']} steps = {p['steps'] / r:6.0f} s)")

    unet = build_model(
        "unet",
        {
            "in_channels": v["embedding_dim"],
            "base_channels": d["base_channels"],
            "channel_mult": d["channel_mult"],
            "num_res_blocks": d["num_res_blocks"],
            "attention": d["attention"],
        },
    ).to(dev)
    diff = GaussianDiffusion(d["schedule"], d["timesteps"]).to(dev)
    opt = torch.optim.Adam(unet.parameters())
    z = torch.randn(d["batch_size"], v["embedding_dim"], 7, 7, device=dev)

    def diff_step():
        t = torch.randint(0, d["timesteps"], (len(z),), device=dev)
        loss = diff.training_losses(unet, z, t).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    r = rate(diff_step, 20)
    print(f"train_diffusion  {r:8.1f} steps/s  (batch {d['batch_size']}; {d['steps']} steps = {d['steps'] / r:6.0f} s)")

    unet.eval()
    pc.eval()
    zb = torch.randn(500, v["embedding_dim"], 7, 7, device=dev)
    tb = torch.full((500,), 500, device=dev)
    with torch.no_grad():
        r = rate(lambda: unet(zb, tb), 5)
        print(
            f"U-Net forward    {r * 500:8.0f} images/s -> DDIM-50: {1000 * 50 / (r * 500):5.0f} s and "
            f"DDPM-{d['timesteps']}: {1000 * d['timesteps'] / (r * 500):6.0f} s per 1000 images"
        )
        cb = torch.randint(0, v["num_embeddings"], (500, 7, 7), device=dev)
        r = rate(lambda: pc(cb), 5)
        print(
            f"PixelCNN forward {r * 500:8.0f} grids/s  -> 49 positions: {1000 * 49 / (r * 500):5.0f} s per 1000 images"
        )


if __name__ == "__main__":
    main()
