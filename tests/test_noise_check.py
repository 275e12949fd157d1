"""The evaluate stage's noise check (issue #14: the study's 3D latent diffusion sampled pure noise
and nothing said so). ``noise_check`` itself, and the failure caught on real samples: the codes
drawn by the trained and by the untrained (8-step) latent diffusion model of the 3D default
(tests/data/noise_check_anatomy3d.npz and its VQ-VAE, written by
``python benchmarks/noise_check.py --run results/anatomy3d --configfile pipeline/configs/anatomy3d.yaml
--write-fixture tests/data/noise_check_anatomy3d.npz``), judged against a freshly prepared
anatomy3d dataset through the real evaluate stage by the label-free judge that ``train_simclr``
trains on it (tests/data/noise_check_anatomy3d.simclr.pt: the 3D default's ``simclr/model.pt``,
trained as a user gets it; training it here cost 280-450 s of the suite's time, and
``train_simclr`` itself runs in tests/test_volumes.py and tests/test_own_data.py)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import ROOT, prepare

from pipeline.checkpoint import load_model
from pipeline.config import resolve
from pipeline.evaluate import NOISE_STRUCTURE_THRESHOLD, noise_check
from pipeline.io import write_json
from pipeline.stages import get_stage

DATA = ROOT / "tests" / "data"


def test_noise_check_places_coverage_between_the_noise_row_and_real_images():
    assert noise_check(0.15, 0.15, 0.825) == (0.0, "noise")
    structure, verdict = noise_check(0.70, 0.15, 0.825)
    assert verdict == "pass" and math.isclose(structure, 0.55 / 0.675)
    assert noise_check(0.45, 0.15, 0.825)[1] == "noise"  # 0.444: the 40-step model, blobs without anatomy
    assert noise_check(0.9, 0.15, 0.825)[0] > 1  # more coverage than the real test images: allowed
    assert noise_check(0.15 + 0.675 * NOISE_STRUCTURE_THRESHOLD, 0.15, 0.825)[1] == "pass"
    # a judge that does not tell real images from noise decides nothing
    assert noise_check(0.5, 0.45, 0.5) == (None, "undecided")
    assert noise_check(float("nan"), 0.1, 0.9) == (None, "undecided")
    assert noise_check(None, 0.1, 0.9) == (None, "undecided")


@pytest.mark.slow
def test_untrained_latent_diffusion_is_reported_as_noise_and_the_trained_default_is_not(tmp_path):
    cfg = resolve([ROOT / "pipeline" / "configs" / "anatomy3d.yaml"], overrides=["device=cpu"])
    run = tmp_path / "anatomy3d"
    prepare(cfg, run)  # the 3D default's 300 augmented copies of nibabel's anatomy, as a user gets them
    (run / "simclr").mkdir()  # the label-free judge train_simclr trained on this dataset
    shutil.copyfile(DATA / "noise_check_anatomy3d.simclr.pt", run / "simclr" / "model.pt")
    (run / "vqvae").mkdir()
    shutil.copyfile(DATA / "noise_check_anatomy3d.vqvae.pt", run / "vqvae" / "model.pt")
    vqvae, _ = load_model(run / "vqvae" / "model.pt")
    codes = np.load(DATA / "noise_check_anatomy3d.npz")
    sets = {"trained": "diffusion_dpmsde", "untrained": "diffusion_dpmsde_b0.01"}
    (run / "samples").mkdir()
    for key, name in sets.items():
        with torch.no_grad():
            images = vqvae.decode_codes(torch.from_numpy(codes[key]).long()).clamp(0, 1).numpy()
        assert images.shape == (40, 1, 32, 40, 24)
        np.save(run / "samples" / f"{name}.npy", images.astype(np.float32))
        write_json(run / "samples" / f"{name}.json", {"num_samples": len(images)})
    cfg["sample"]["sets"] = list(sets.values())
    out = get_stage("evaluate")(cfg, str(run))
    m = json.loads((run / "report" / "metrics.json").read_text())
    verdicts = {name: row["noise_check"] for name, row in m["sets"].items()}
    assert verdicts == {"diffusion_dpmsde": "pass", "diffusion_dpmsde_b0.01": "noise"}, m["sets"]
    assert m["floor"]["noise_check"] == "pass" and m["references"]["noise"]["noise_check"] == "noise"
    assert m["references"]["blurred_real"]["noise_check"] == "pass"
    # with a margin: the untrained model sits at the noise row, the trained one near the real images
    assert m["sets"]["diffusion_dpmsde_b0.01"]["structure"] < 0.3 < 0.6 < m["sets"]["diffusion_dpmsde"]["structure"]
    assert out["noise_sets"] == ["diffusion_dpmsde_b0.01"]
    summary = (run / "report" / "summary.md").read_text()
    assert "Sets reported as noise: `diffusion_dpmsde_b0.01`" in summary
    header = (run / "report" / "sets.tsv").read_text().splitlines()[0].split("\t")
    assert "noise check" in header and "structure (0 noise, 1 real)" in header
