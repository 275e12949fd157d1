"""What bf16 autocast changes, part by part, on a finished float32 run (issue #21).

    python benchmarks/bf16_drift.py --run results/default [--bf16-run results/bf16] [--device cpu]

On 500 test images (or grids) of the run, each model is run once in float32 and once under
``torch.autocast(<device>, dtype=torch.bfloat16)``, with the weights and inputs the same:

* VQ-VAE: for the *same* encoder output, the codes of the nearest-code search written as
  ``|x|^2 - 2 x.e + |e|^2`` in bf16 (what the quantizer did before it got a float32 region)
  and of :meth:`VectorQuantizerEMA.nearest` (float32 inside autocast); the codes of the whole
  forward (encoder in bf16, quantizer float32); the reconstruction MSE of both;
* PixelCNN: bits/code, KL(float32 || bf16) of the code distributions and argmax changes, with
  the output layer in bf16 and in float32 (what the model does now);
* latent diffusion: the prediction's RMS change, with the U-Net's output convolution in bf16 and
  in float32, against the model's own RMS error.

With ``--bf16-run`` (the same config trained with ``bf16: true``) it also prints the stage
metrics and FD / floor of both runs side by side. The table of docs/cluster.md ("bf16 and what
stays float32") comes from this script.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.checkpoint import load_model
from pipeline.data import read_dataset
from pipeline.diffusion import GaussianDiffusion
from pipeline.latents import read_split


def _changed(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a != b).float().mean():.1%}"


def vqvae_rows(run: Path, device, n: int, ac) -> list[tuple[str, str]]:
    vq, _ = load_model(run / "vqvae" / "model.pt", device=device)
    x = read_dataset(run / "data" / "dataset.h5", "test").unit()[:n].to(device)
    q = vq.quantizer
    with torch.no_grad():
        z = vq.encode(x)
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        want = q.nearest(flat)
        emb = q.embedding
        with ac():
            naive = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ emb.t() + emb.pow(2).sum(1)[None]).argmin(1)
            now = q.nearest(flat)
            recon_b, out_b = vq(x)
        recon, out = vq(x)
    mse = F.mse_loss(recon, x).item()
    mse_b = F.mse_loss(recon_b.float(), x).item()
    return [
        ("VQ-VAE: nearest code, same z_e, expansion in bf16 (before)", f"{(naive != want).float().mean():.1%} changed"),
        ("VQ-VAE: nearest code, same z_e, float32 region (now)", f"{(now != want).float().mean():.1%} changed"),
        (
            "VQ-VAE: whole forward under autocast (encoder bf16)",
            f"{(out_b.codes != out.codes).float().mean():.1%} changed",
        ),
        ("VQ-VAE: reconstruction MSE float32 / bf16 forward", f"{mse:.5f} / {mse_b:.5f}"),
    ]


def pixelcnn_rows(run: Path, device, n: int, ac) -> list[tuple[str, str]]:
    net, _ = load_model(run / "pixelcnn" / "model.pt", device=device, weights="ema")
    test, _ = read_split(run / "latents" / "latents.h5", "test")
    c = torch.from_numpy(test.codes.astype(np.int64))[:n].to(device)
    with torch.no_grad():
        l32 = net(c)
        with ac():
            x = net.embedding(c).movedim(-1, 1)
            v, h = x, x
            for layer in net.layers:
                v, h = layer(v, h, None)
            head_bf16 = net.head(h).float()
            now = net(c)
    rows = []
    for name, logits in (("output layer in bf16", head_bf16), ("output layer float32 (now)", now)):
        p32, p = l32.log_softmax(1), logits.log_softmax(1)
        kl = (p32.exp() * (p32 - p)).sum(1).mean().item()
        bits = F.cross_entropy(logits, c).item() / math.log(2)
        rows.append(
            (
                f"PixelCNN: {name}",
                f"{bits:.4f} bits/code (float32 {F.cross_entropy(l32, c).item() / math.log(2):.4f}); KL {kl:.1e} "
                f"nats; max |dlogit| {(logits - l32).abs().max():.3f}; "
                f"argmax {_changed(logits.argmax(1), l32.argmax(1))} changed",
            )
        )
    return rows


def diffusion_rows(run: Path, device, n: int, ac) -> list[tuple[str, str]]:
    net, st = load_model(run / "diffusion" / "model.pt", device=device, weights="ema")
    diff = GaussianDiffusion(**st["diffusion"]).to(device)
    test, _ = read_split(run / "latents" / "latents.h5", "test")
    shape = (1, -1, *([1] * (test.latents.ndim - 2)))
    mean, std = st["latent_mean"].float().view(shape), st["latent_std"].float().view(shape)
    z = ((torch.from_numpy(test.latents).float() - mean) / std)[:n].to(device)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, diff.num_timesteps, (len(z),), generator=g).to(device)
    noise = torch.randn(z.shape, generator=g).to(device)
    with torch.no_grad():
        xt = diff.q_sample(z, t, noise)
        o32 = net(xt, t)
        with ac():
            ob = net(xt, t).float()
        conv = net.conv_out.forward

        def float32_out(h):
            with torch.autocast(device.type, enabled=False):
                return conv(h.float())

        net.conv_out.forward = float32_out
        try:
            with ac():
                oh = net(xt, t).float()
        finally:
            net.conv_out.forward = conv
    err = ((o32 - diff.target(z, noise, t)) ** 2).mean().sqrt().item()
    rms = lambda o: ((o - o32) ** 2).mean().sqrt().item()  # noqa: E731
    return [
        ("Diffusion: prediction change, all bf16 (now)", f"RMS {rms(ob):.4f} (the model's own RMS error {err:.3f})"),
        ("Diffusion: prediction change, output conv float32", f"RMS {rms(oh):.4f} (tried, no gain: not kept)"),
    ]


def run_rows(run: Path) -> dict:
    out = {}
    vq = json.loads((run / "vqvae" / "metrics.json").read_text())
    pc = json.loads((run / "pixelcnn" / "metrics.json").read_text())
    df = json.loads((run / "diffusion" / "metrics.json").read_text())
    out["VQ-VAE test MSE / codes in use / train s"] = (
        f"{vq['test_recon_mse']:.5f} / {vq['test_codes_in_use']} / {vq['train_seconds']:.0f}"
    )
    out["PixelCNN test bits/code / train s"] = f"{pc['test_nll_bits_per_code']:.4f} / {pc['train_seconds']:.0f}"
    out["diffusion test eps-MSE (EMA) / train s"] = f"{df['test_loss_ema']:.4f} / {df['train_seconds']:.0f}"
    report = json.loads((run / "report" / "metrics.json").read_text())
    for name, row in report["sets"].items():
        out[f"FD / floor {name} (s/1000 images)"] = f"{row['headline_fd_ratio']:.2f} ({row['seconds_per_1000']:.1f})"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="results/default", help="a finished float32 run")
    ap.add_argument("--bf16-run", default=None, help="the same config trained with bf16: true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = Path(args.run)

    def ac():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    rows = vqvae_rows(run, device, args.n, ac) + pixelcnn_rows(run, device, args.n, ac)
    rows += diffusion_rows(run, device, args.n, ac)
    print(f"bf16 autocast on {device.type}, the float32 weights of {run}, N = {args.n}\n")
    print("| part | measured |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.bf16_run:
        a, b = run_rows(run), run_rows(Path(args.bf16_run))
        print(f"\n| number | {run.name} (float32) | {Path(args.bf16_run).name} (bf16) |\n| --- | --- | --- |")
        for key in a:
            print(f"| {key} | {a[key]} | {b.get(key, '-')} |")


if __name__ == "__main__":
    main()
