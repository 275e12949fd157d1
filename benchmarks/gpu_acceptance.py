"""The first GPU run in one command: check the GPU path end to end and measure what the plan assumes.

    python benchmarks/gpu_acceptance.py [--out results/gpu_acceptance] [--budget-s 15]

On a CUDA machine (an A100/H100-class GPU: about 5 minutes; 8 at most), in order:

1. ``doctor``: the preflight of ``python -m pipeline doctor`` (torch build against the driver,
   GPUs, bf16/TF32, NCCL, the run folder) with ``device: cuda``;
2. the tiny chain (prepare -> VQ-VAE -> latents -> PixelCNN and diffusion -> two sample sets) on
   the GPU in float32 and in bf16: the nearest code under autocast must equal the float32 one
   for the same z_e, the bf16 VQ-VAE's reconstruction MSE must be within 5 % of float32's with
   its codebook in use, and every loss finite;
3. every training stage at the GPU preset's model sizes and batch sizes
   (``cluster/bigred200/pipeline.yaml`` + ``pipeline/configs/bigred200_full.yaml``): steps/s, the
   achieved TFLOP/s (the plan's own FLOP count, :func:`pipeline.flops.stage_cost`, divided by the
   measured step time), its share of the GPU's dense bf16 peak, the batch-2 step time (the
   latency floor), and peak GPU memory against the plan's estimate
   (:func:`pipeline.flops.stage_memory`) as a ratio;
4. images/s of each sampler (PixelCNN categorical and autoguided; DDIM, DPM-Solver++ SDE,
   autoguided, DDPM) at the preset's sizes and sampling batch, decoding included;
5. with 2 or more GPUs, ``train_diffusion`` of the tiny chain as a 2-rank DDP stage over NCCL,
   whose logged losses must follow the 1-GPU run at the same global batch.

It prints one table, writes ``gpu_acceptance.json`` and prints the measured ``assumed_tflops``
and ``assumed_step_ms`` lines for ``cluster/bigred200/slurm.yaml``. Exit status: 0 when every
check passed, 1 otherwise.

Without CUDA the same code runs as a **CPU rehearsal** at the tiny sizes of the test config
(DDP over gloo with 2 processes), so the test suite covers the script; its first line says that
nothing was measured on a GPU, and its figures are not for the cluster YAML.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import deep_merge, resolve  # noqa: E402
from pipeline.runtime import autocast  # noqa: E402

TINY = ROOT / "tests" / "configs" / "tiny.yaml"
PRESET = [ROOT / "cluster" / "bigred200" / "pipeline.yaml", ROOT / "pipeline" / "configs" / "bigred200_full.yaml"]
#: the tiny chain's VQ-VAE: big enough to learn its codebook in a few seconds (width 32; 400 steps:
#: on the CPU 300 kept 126 and 128 of 128 codes in float32 and bf16, 200 kept 5, and bf16's 600
#: took 116 s of the suite's CPU rehearsal)
TINY_CHAIN = {
    "vqvae": {"hidden_channels": 32, "steps": 400, "log_every": 100, "checkpoint_every": 200},
    "pixelcnn": {"steps": 100, "log_every": 20, "checkpoint_every": 50},
    "diffusion": {"steps": 100, "log_every": 20, "checkpoint_every": 50},
    "sample": {"sets": ["pixelcnn", "diffusion_dpmsde"]},
}
TRAINING_STAGES = ("train_vqvae", "train_classifier", "train_pixelcnn", "train_diffusion")
JUDGES = ("train_classifier", "train_simclr")  # trained in float32 whatever bf16 says
SAMPLERS = (
    "pixelcnn",
    "pixelcnn_ag1.5",
    "diffusion_ddim",
    "diffusion_dpmsde",
    "diffusion_dpmsde_ag2",
    "diffusion_ddpm",
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- 1. doctor ---------------------------------------------------------------------------------
def doctor(cfg: dict, out: Path) -> dict:
    from pipeline.doctor import format_checks, run_checks

    checks = run_checks(cfg, out, slurm=False)
    print(format_checks(checks), end="")
    return {
        "passed": not any(c.status == "fail" for c in checks),
        "checks": [c.__dict__ for c in checks],
    }


# --- 2. the tiny chain in float32 and bf16 -------------------------------------------------------
def _last_losses(run: Path) -> dict:
    out = {}
    for stage in ("vqvae", "pixelcnn", "diffusion"):
        with open(run / stage / "train_log.csv") as f:
            rows = [float(r["loss"]) for r in csv.DictReader(f)]
        out[stage] = rows
    return out


def tiny_chain(device: torch.device, out: Path) -> tuple[dict, dict]:
    """Both runs of the tiny chain; returns (result, the float32 config)."""
    from pipeline.data import read_dataset
    from pipeline.stages import get_stage

    base = deep_merge(resolve([TINY]), {**TINY_CHAIN, "device": device.type})
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        cfg = deep_merge(base, {"bf16": bf16})
        run = out / f"tiny_{name}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        for stage in ("prepare_data", "train_vqvae", "extract_latents", "train_pixelcnn", "train_diffusion"):
            get_stage(stage)(cfg, str(run), threads=2)
        get_stage("sample")(cfg, str(run), sample_sets=list(cfg["sample"]["sets"]), threads=2)
        vq = json.loads((run / "vqvae" / "metrics.json").read_text())
        samples = [np.load(run / "samples" / f"{s}.npy") for s in cfg["sample"]["sets"]]
        runs[name] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "recon_mse": vq["test_recon_mse"],
            "codes_in_use": vq["test_codes_in_use"],
            "perplexity": vq["test_perplexity"],
            "losses": _last_losses(run),
            "samples_finite": all(bool(np.isfinite(a).all()) for a in samples),
        }
    # the nearest code for the same z_e, under autocast on this device, against float32
    from pipeline.checkpoint import load_model

    vq, _ = load_model(out / "tiny_fp32" / "vqvae" / "model.pt", device=device)
    x = read_dataset(out / "tiny_fp32" / "data" / "dataset.h5", "test").unit().to(device)
    with torch.no_grad():
        z = vq.encode(x)
        flat = z.movedim(1, -1).reshape(-1, z.shape[1])
        want = vq.quantizer.nearest(flat)
        with autocast(device, True):
            got = vq.quantizer.nearest(flat)
    ratio = runs["bf16"]["recon_mse"] / runs["fp32"]["recon_mse"]
    k = base["vqvae"]["num_embeddings"]
    finite = all(math.isfinite(v) for r in runs.values() for rows in r["losses"].values() for v in rows)
    checks = {
        "nearest code under autocast equals float32": bool(torch.equal(got, want)),
        "bf16 recon MSE within 5 % of float32": abs(ratio - 1) <= 0.05,
        "codebook in use (>= 90 % of K) in both": all(r["codes_in_use"] >= 0.9 * k for r in runs.values()),
        "every loss finite, samples finite": finite and all(r["samples_finite"] for r in runs.values()),
    }
    return {"runs": runs, "recon_mse_ratio": ratio, "checks": checks, "passed": all(checks.values())}, deep_merge(
        base, {"bf16": False}
    )


# --- 3. training stages at the preset's sizes ----------------------------------------------------
def measure_training(stage: str, cfg: dict, device: torch.device, budget_s: float, max_steps: int) -> dict:
    from pipeline.flops import stage_cost, stage_memory, training_workload

    torch.manual_seed(0)
    bf16 = bool(cfg["bf16"]) and stage not in JUDGES
    with torch.device(device):
        net, make_batch, loss_of, sec = training_workload(stage, cfg)
        batch = int(sec["batch_size"])
        inputs, small = make_batch(batch), make_batch(2)  # 2: the classifier's BatchNorm
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step(args) -> None:
        with autocast(device, bf16):
            loss = loss_of(net, *args)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step(inputs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n, t0 = 0, time.perf_counter()
    while n < max_steps and (n < 3 or time.perf_counter() - t0 < budget_s):
        step(inputs)
        n += 1
        if n % 10 == 0:
            sync(device)
    sync(device)
    per_step = (time.perf_counter() - t0) / n
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    for _ in range(3):
        step(small)
    sync(device)
    t1 = time.perf_counter()
    for _ in range(10):
        step(small)
    sync(device)
    latency_ms = (time.perf_counter() - t1) / 10 * 1000
    cost = stage_cost(stage, cfg)
    flops_per_step = cost.flops / max(1, int(sec["steps"]))
    memory = stage_memory(stage, cfg)
    achieved = flops_per_step / per_step / 1e12
    return {
        "stage": stage,
        "batch": batch,
        "bf16": bf16,
        "steps_measured": n,
        "steps_per_s": 1 / per_step,
        "step_ms": per_step * 1000,
        "small_batch_step_ms": latency_ms,
        "gflop_per_step": flops_per_step / 1e9,
        "achieved_tflops": achieved,
        "peak_gpu_gib": peak,
        "planned_gpu_gib": None if memory is None else memory.total,
        "memory_ratio": None if peak is None or memory is None else peak / memory.total,
        "stage_hours_at_measured": int(sec["steps"]) * per_step / 3600,
    }


# --- 4. samplers ---------------------------------------------------------------------------------
def measure_sampler(name: str, cfg: dict, device: torch.device) -> dict:
    from pipeline.diffusion import GaussianDiffusion, autoguidance
    from pipeline.models import UNET_KINDS, build_model, model_args
    from pipeline.sample import sample_diffusion_latents, sample_pixelcnn
    from pipeline.sets import parse_sample_set
    from pipeline.sources import expected_shape

    spec = parse_sample_set(name)
    sec = cfg["sample"]
    vq_sec = cfg["vqvae"]
    img = tuple(expected_shape(cfg["data"]))
    grid = tuple(s // int(vq_sec.get("downsample", 4)) for s in img[1:])
    k, d = int(vq_sec["num_embeddings"]), int(vq_sec["embedding_dim"])
    torch.manual_seed(0)
    vqvae = build_model("vqvae", model_args("vqvae", vq_sec, in_channels=img[0])).to(device).eval()
    n = int(sec["batch_size"])
    if spec.method == "ddpm":
        n = min(n, int(sec.get("ddpm_num_samples") or n))
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = bool(cfg["bf16"])
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if spec.prior == "pixelcnn":
            args = model_args("pixelcnn", cfg["pixelcnn"], in_channels=k)
            net = build_model("pixelcnn", args).to(device).eval()
            guide = build_model("pixelcnn", args).to(device).eval() if spec.autoguidance else None
            with autocast(device, bf16):
                codes = sample_pixelcnn(
                    net, n, grid, generator=g, device=device, guide=guide, autoguidance=spec.autoguidance or 1.0
                )
            evals = math.prod(grid) * (2 if guide is not None else 1)
        else:
            sec_d = cfg["diffusion"]
            kind = UNET_KINDS[sec_d.get("network", "own")]
            net = build_model(kind, model_args(kind, sec_d, in_channels=d)).to(device).eval()
            fn = net
            if spec.autoguidance:
                fn = autoguidance(net, build_model(kind, model_args(kind, sec_d, in_channels=d)).to(device).eval(), 2.0)
            diffusion = GaussianDiffusion(
                sec_d["schedule"], int(sec_d["timesteps"]), prediction=sec_d["prediction"]
            ).to(device)
            steps = int(sec["ddim_steps"] if spec.method == "ddim" else sec["solver_steps"])

            def eps(x, t):
                with autocast(device, bf16):
                    return fn(x, t)

            z = sample_diffusion_latents(eps, diffusion, n, d, spec.method, steps, 0.0, g, device, shape=grid)
            codes = vqvae.quantizer.snap(z)
            evals = (diffusion.num_timesteps if spec.method == "ddpm" else steps) * (2 if spec.autoguidance else 1)
        images = vqvae.decode_codes(codes)
    sync(device)
    seconds = time.perf_counter() - t0
    return {
        "set": name,
        "n": n,
        "network_evals": evals,
        "images_per_s": n / seconds,
        "seconds": seconds,
        "finite": bool(torch.isfinite(images).all()),
    }


# --- 5. DDP ----------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, backend: str, cfg: dict, run: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    torch.distributed.init_process_group(backend)
    try:
        from pipeline.stages import get_stage

        get_stage("train_diffusion")(cfg, run, threads=1)
    finally:
        torch.distributed.destroy_process_group()


def ddp_check(cfg: dict, out: Path, device: torch.device) -> dict:
    """train_diffusion of the tiny chain as a 2-rank DDP stage (NCCL on CUDA, gloo on the CPU)
    against the 1-process run at the same global batch."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"needs 2 GPUs, found {torch.cuda.device_count()}", "passed": True}
    backend = "nccl" if device.type == "cuda" else "gloo"
    single, ddp = out / "tiny_fp32", out / "tiny_ddp"
    shutil.rmtree(ddp, ignore_errors=True)
    for part in ("data", "vqvae", "latents"):
        shutil.copytree(single / part, ddp / part)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, backend, cfg, str(ddp)), nprocs=2, join=True)
    a = _last_losses(single)["diffusion"]
    b = [float(r["loss"]) for r in csv.DictReader(open(ddp / "diffusion" / "train_log.csv"))]
    rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
    metrics = json.loads((ddp / "diffusion" / "metrics.json").read_text())
    return {
        "backend": backend,
        "world_size": metrics.get("world_size"),
        "seconds": round(time.perf_counter() - t0, 1),
        "losses_1": a,
        "losses_2": b,
        "max_relative_difference": rel,
        "passed": metrics.get("world_size") == 2 and rel < 0.05,
    }


# --- the report -------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def report(result: dict) -> str:
    lines = [
        "",
        "| training stage | batch | bf16 | steps/s | ms/step | batch-2 ms | GFLOP/step | TFLOP/s | "
        "share of bf16 peak | peak GiB | plan GiB | peak / plan |",
        "|" + " --- |" * 12,
    ]
    peak = result["peak_bf16_tflops"]
    for r in result["training"]:
        share = None if not peak else r["achieved_tflops"] / peak
        lines.append(
            f"| {r['stage']} | {r['batch']} | {'yes' if r['bf16'] else 'no'} | {r['steps_per_s']:.1f} | "
            f"{r['step_ms']:.2f} | {r['small_batch_step_ms']:.2f} | {r['gflop_per_step']:.1f} | "
            f"{r['achieved_tflops']:.2f} | {_fmt(share, '.1%')} | {_fmt(r['peak_gpu_gib'], '.2f')} | "
            f"{_fmt(r['planned_gpu_gib'], '.2f')} | {_fmt(r['memory_ratio'], '.2f')} |"
        )
    lines += ["", "| sampler | images | network evals | images/s |", "| --- | ---: | ---: | ---: |"]
    for r in result["sampling"]:
        lines.append(f"| {r['set']} | {r['n']} | {r['network_evals']} | {r['images_per_s']:.1f} |")
    chain = result["tiny_chain"]
    lines += ["", "| tiny chain check | result |", "| --- | --- |"]
    for name, ok in chain["checks"].items():
        lines.append(f"| {name} | {'pass' if ok else 'FAIL'} |")
    runs = chain["runs"]
    lines.append(
        f"| recon MSE float32 / bf16 (ratio) | {runs['fp32']['recon_mse']:.5f} / {runs['bf16']['recon_mse']:.5f} "
        f"({chain['recon_mse_ratio']:.3f}) |"
    )
    ddp = result["ddp"]
    if "skipped" in ddp:
        lines.append(f"| DDP | skipped: {ddp['skipped']} |")
    else:
        lines.append(
            f"| DDP, 2 ranks over {ddp['backend']}, vs 1 process | max relative loss difference "
            f"{ddp['max_relative_difference']:.2e}: {'pass' if ddp['passed'] else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def assumptions(result: dict) -> tuple[float, float]:
    """(assumed_tflops, assumed_step_ms) from the measurements: the FLOP-weighted throughput of
    the training stages (total FLOPs of their steps / total time) and the median batch-2 step time."""
    rows = result["training"]
    flops = sum(r["gflop_per_step"] * 1e9 for r in rows)
    seconds = sum(r["step_ms"] / 1000 for r in rows)
    return flops / seconds / 1e12, float(np.median([r["small_batch_step_ms"] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/gpu_acceptance", help="folder for the runs and gpu_acceptance.json")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds per training stage (15 GPU, 1 CPU)")
    ap.add_argument("--max-steps", type=int, default=2000)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        name = torch.cuda.get_device_name(0)
        print(
            f"GPU acceptance on {torch.cuda.device_count()} x {name} "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    else:
        name = "cpu"
        print(
            "CPU REHEARSAL: no CUDA GPU here, NOTHING WAS MEASURED ON A GPU; the same code at the test config's tiny "
            "sizes, so that the script itself is tested (its figures are not for the cluster YAML)"
        )
        torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (15.0 if cuda else 1.0)
    sizes = resolve([str(p) for p in PRESET]) if cuda else resolve([TINY])
    sizes = deep_merge(sizes, {"device": device.type, "bf16": True})
    from pipeline.flops import peak_bf16_tflops

    t0 = time.perf_counter()
    result: dict = {"gpu": cuda, "device_name": name, "device_count": torch.cuda.device_count() if cuda else 0}
    result["peak_bf16_tflops"] = peak_bf16_tflops(name) if cuda else None
    print("\n1. doctor")
    result["doctor"] = doctor(sizes, out)
    print("\n2. the tiny chain in float32 and in bf16")
    result["tiny_chain"], fp32_cfg = tiny_chain(device, out)
    print("\n3. training stages at " + ("the GPU preset's sizes" if cuda else "tiny sizes"))
    result["training"] = []
    for stage in TRAINING_STAGES:
        row = measure_training(stage, sizes, device, budget, args.max_steps)
        print(f"   {stage}: {row['steps_per_s']:.1f} steps/s, {row['achieved_tflops']:.3f} TFLOP/s")
        result["training"].append(row)
    print("\n4. samplers")
    result["sampling"] = [measure_sampler(s, sizes, device) for s in SAMPLERS]
    print("\n5. DDP")
    result["ddp"] = ddp_check(fp32_cfg, out, device)
    tflops, step_ms = assumptions(result)
    result["assumed_tflops"], result["assumed_step_ms"] = tflops, step_ms
    result["seconds"] = round(time.perf_counter() - t0, 1)
    passed = {
        "doctor": result["doctor"]["passed"],
        "tiny chain": result["tiny_chain"]["passed"],
        "samplers finite": all(r["finite"] for r in result["sampling"]),
        "ddp": result["ddp"]["passed"],
    }
    result["passed"] = passed
    print(report(result))
    tag = f"measured by benchmarks/gpu_acceptance.py on {name}, {time.strftime('%Y-%m-%d')}"
    if not cuda:
        tag = "CPU rehearsal, NOT for slurm.yaml"
    print(f"for cluster/bigred200/slurm.yaml ({tag}):")
    print(f"  assumed_tflops: {tflops:.3g}")
    print(f"  assumed_step_ms: {step_ms:.3g}")
    from pipeline.io import write_json

    write_json(out / "gpu_acceptance.json", result)
    failed = [k for k, ok in passed.items() if not ok]
    verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
    what = "GPU acceptance" if cuda else "CPU rehearsal"
    print(f"\n{what}: {verdict} in {result['seconds']:.0f} s; {out / 'gpu_acceptance.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
