"""Validation of the evaluate stage's noise check (``pipeline.evaluate.noise_check``).

    python benchmarks/noise_check.py --run results/anatomy3d --configfile pipeline/configs/anatomy3d.yaml \
        [--budgets 0.05 0.1 0.25] [--grid docs/volumes/noise_check.png] \
        [--write-fixture tests/data/noise_check_anatomy3d.npz]
    python benchmarks/noise_check.py --run results/judgeval --configfile pipeline/configs/judge_validation.yaml \
        --sets-only

The study's 3D latent diffusion converged in loss and sampled pure noise. On a finished 3D run
this judges, with the pipeline's own evaluate stage, sets that span that failure:

* the run's own sets (``sample.sets``: the trained priors and the 8-step, untrained
  ``diffusion_dpmsde_b0.01``);
* the same diffusion model trained for a fraction f of its steps (``--budgets``; trained and
  sampled with ``python -m pipeline train_diffusion --budget f`` and ``sample`` if missing);
* **mis-scaled** decodings of the trained model's latents z (unit variance; latent diffusion
  rescales the latents, Rombach et al. 2022 sec. 4.3.2 and app. G): not mapped back (z instead
  of z * std + mean; the train latents' std is 0.17 to 0.32 here) or with 3 x the std, snapped to
  the codebook as the sample stage does or fed to the decoder as they are. Each is judged in a
  scratch copy of the run under the name ``diffusion_dpmsde``.

It prints one row per set: what its grid shows (:data:`LOOKED_AT`, from looking at the grids),
FD / floor, coverage, structure and the verdict, and exits 1 if a looked-at row is judged
wrongly. ``--sets-only`` re-evaluates a run's own sets only (the 2D validation: every set of
``judge_validation.yaml`` draws digits, so all are scored as structure and the noise row as noise).
``--write-fixture`` stores the codes (uint8) of the trained and the untrained model's samples
and the run's VQ-VAE, which tests/test_noise_check.py decodes and judges against a freshly
prepared dataset and a freshly trained judge.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (variant, what it is, decode): the trained model's latents z (unit variance)
#: decoded at the wrong scale, snapped to the codebook (as the sample stage does) or fed to the
#: decoder as they are (a continuous-latent decoder, as in the study)
MISSCALED = [
    (
        "snapped, unscaled",
        "codebook(z), not mapped back",
        lambda vq, z, m, s: vq.decode_codes(vq.quantizer.snap(z)),
    ),
    (
        "snapped, std x3",
        "codebook(3 std z + mean)",
        lambda vq, z, m, s: vq.decode_codes(vq.quantizer.snap(z * 3 * s + m)),
    ),
    ("continuous, scaled", "decoder(std z + mean), no codebook", lambda vq, z, m, s: vq.decode(z * s + m)),
    ("continuous, unscaled", "decoder(z), no codebook", lambda vq, z, m, s: vq.decode(z)),
    ("continuous, std x3", "decoder(3 std z + mean), no codebook", lambda vq, z, m, s: vq.decode(z * 3 * s + m)),
]


def sample_latents(
    cfg: dict, run: Path, folder: str, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(z, mean, std, vqvae): ``n`` DPM-Solver++ SDE samples z float (n, D, *grid) at unit
    variance (the sample stage's solver and steps, seed ``sample.seed``) of the diffusion model
    in ``run/folder``, the train latents' per-channel mean and std (broadcastable), and the VQ-VAE."""
    from pipeline.checkpoint import load_model
    from pipeline.diffusion import GaussianDiffusion
    from pipeline.sample import sample_diffusion_latents

    vqvae, _ = load_model(run / "vqvae" / "model.pt")
    net, state = load_model(run / folder / "model.pt")
    diffusion = GaussianDiffusion(**state["diffusion"])
    grid = tuple(state["grid"])
    per_channel = (1, -1, *([1] * len(grid)))
    mean, std = (state[k].float().view(per_channel) for k in ("latent_mean", "latent_std"))
    clip = (state["latent_min"].float().view(per_channel), state["latent_max"].float().view(per_channel))
    g = torch.Generator().manual_seed(int(cfg["sample"]["seed"]))
    z = sample_diffusion_latents(
        net,
        diffusion,
        n,
        vqvae.embedding_dim,
        "dpmsde",
        int(cfg["sample"]["solver_steps"]),
        0.0,
        g,
        shape=grid,
        clip=clip if cfg["sample"]["clip_denoised"] else None,
    )
    return z, mean, std, vqvae


def judge_variant(cfg: dict, run: Path, images: np.ndarray, threads: int) -> dict:
    """The evaluate stage's row for ``images`` float32 (N, 1, D, H, W), judged as the only set
    ``diffusion_dpmsde`` of a scratch copy of ``run`` (models linked, not copied)."""
    from pipeline.evaluate import evaluate
    from pipeline.io import write_json

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / run.name
        scratch.mkdir()
        for child in run.iterdir():
            if child.name not in ("samples", "report"):
                (scratch / child.name).symlink_to(child)
        (scratch / "samples").mkdir()
        np.save(scratch / "samples" / "diffusion_dpmsde.npy", images)
        write_json(scratch / "samples" / "diffusion_dpmsde.json", {"num_samples": len(images)})
        sub = {**cfg, "sample": {**cfg["sample"], "sets": ["diffusion_dpmsde"]}}
        evaluate(sub, scratch, threads=threads)
        return json.loads((scratch / "report" / "metrics.json").read_text())["sets"]["diffusion_dpmsde"]


#: what the grids of the 3D default show (looked at, docs/volumes/noise_check.png): "noise" = no
#: anatomy, "structure" = anatomy; rows not listed (b0.25: faint ventricles; the mis-scaled
#: decodings: distorted anatomy) are printed but not scored
LOOKED_AT = {
    "noise": "noise",
    "diffusion_dpmsde_b0.01": "noise",
    "diffusion_dpmsde_b0.05": "noise",
    "diffusion_dpmsde_b0.1": "noise",
    "real_test": "structure",
    "blurred_real": "structure",
    "pixelcnn": "structure",
    "pixelcnn_ag1.5": "structure",
    "diffusion_dpmsde": "structure",
    "diffusion_dpmsde_ag2": "structure",
}


#: the sets of ``--grid``, after real_test and noise
GRID_SETS = [
    "diffusion_dpmsde_b0.01",
    "diffusion_dpmsde_b0.05",
    "diffusion_dpmsde_b0.1",
    "diffusion_dpmsde_b0.25",
    "diffusion_dpmsde",
    "pixelcnn_ag1.5",
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run (sample sets drawn)")
    p.add_argument("--configfile", action="append", default=[], help="the run's config file(s)")
    p.add_argument("--budgets", type=float, nargs="*", default=[0.05, 0.1, 0.25])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write-fixture", type=Path, help="store codes + VQ-VAE for tests/test_noise_check.py")
    p.add_argument("--grid", type=Path, help="three-plane grid: two volumes of each row's set, top to bottom")
    p.add_argument(
        "--sets-only",
        action="store_true",
        help="only re-evaluate the run's sets (2D runs: every set is scored as structure, the noise row as noise)",
    )
    a = p.parse_args(argv)
    from pipeline.config import resolve

    torch.set_num_threads(a.threads)
    run = Path(a.run).resolve()
    cfg = resolve(a.configfile or [run / "samples" / "config.yaml"])
    base = [sys.executable, "-m", "pipeline"]
    common = ["--run", str(run), "--threads", str(a.threads)]
    for f in a.configfile:
        common += ["--configfile", str(Path(f).resolve())]
    from judge_ladder import ensure_budget_sets

    budget_sets = [] if a.sets_only else ensure_budget_sets(run, a.configfile, a.budgets, a.threads)
    models = list(dict.fromkeys([*cfg["sample"]["sets"], *budget_sets]))
    cmd = [*base, "evaluate", *common, "--set", f"sample.sets={json.dumps(models)}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    m = json.loads((run / "report" / "metrics.json").read_text())
    rows = [
        ("real_test", "real test images", m["floor"]),
        *((k, "reference row", r) for k, r in m["references"].items()),
    ]
    rows += [(k, "the run's set", r) for k, r in m["sets"].items()]
    looked_at = dict(LOOKED_AT)
    if a.sets_only:
        looked_at = {name: "noise" if name == "noise" else "structure" for name, _, _ in rows}
    else:
        n = int(cfg["sample"]["num_samples"])
        z, mean, std, vqvae = sample_latents(cfg, run, "diffusion", n)
        for variant, what, decode in MISSCALED:
            with torch.no_grad():
                images = decode(vqvae, z, mean, std).float().clamp(0, 1).numpy()
            rows.append((f"mis-scaled: {variant}", what, judge_variant(cfg, run, images, a.threads)))

    cov = "features_coverage" if "features" in m["evaluation"]["judges"] else "coverage"
    print("set\twhat\tlooked at\tFD/floor\tcoverage\tstructure\tnoise check\tMS-SSIM nearest train")
    for name, what, r in rows:
        st = "–" if r["structure"] is None else f"{r['structure']:.3f}"
        print(
            f"{name}\t{what}\t{looked_at.get(name, '–')}\t{r['headline_fd_ratio']:.2f}\t{r[cov]:.3f}\t{st}\t"
            f"{r['noise_check']}\t{r.get('ms_ssim_nearest_train', float('nan')):.3f}"
        )
    scored = [(name, looked_at[name], r) for name, _, r in rows if name in looked_at]
    wrong = [name for name, seen, r in scored if (seen == "noise") != (r["noise_check"] == "noise")]
    noise_max = max((r["structure"] for _, seen, r in scored if seen == "noise"), default=float("nan"))
    struct_min = min((r["structure"] for _, seen, r in scored if seen == "structure"), default=float("nan"))
    print(
        f"threshold {m['evaluation']['noise_check']['threshold']}; {len(scored)} rows scored; highest structure "
        f"of a noise row {noise_max:.3f}, lowest of a structured row {struct_min:.3f}; "
        f"judged wrongly: {wrong or 'none'}"
    )
    if a.grid and not a.sets_only:
        from pipeline.data import read_dataset
        from pipeline.evaluate import noise_images
        from pipeline.volumes import save_three_plane_grid

        train = read_dataset(run / "data" / "dataset.h5", "train").unit()
        test = read_dataset(run / "data" / "dataset.h5", "test").unit()
        picks = [test[:2].numpy(), noise_images(train, 2).numpy()]
        picks += [np.load(run / "samples" / f"{s}.npy")[:2] for s in GRID_SETS]
        save_three_plane_grid(a.grid, np.concatenate(picks), nrow=2, scale=3)
        print(f"wrote {a.grid}: two volumes per row of real_test, noise, {', '.join(GRID_SETS)}")
    if a.write_fixture:
        z_untrained = sample_latents(cfg, run, "diffusion_b0.01", n)[0]
        with torch.no_grad():
            codes = {
                k: vqvae.quantizer.snap(v * std + mean).numpy().astype(np.uint8)
                for k, v in (("trained", z), ("untrained", z_untrained))
            }
        a.write_fixture.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(a.write_fixture, **codes)
        shutil.copyfile(run / "vqvae" / "model.pt", a.write_fixture.with_suffix(".vqvae.pt"))
        print(f"wrote {a.write_fixture} and {a.write_fixture.with_suffix('.vqvae.pt')}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
