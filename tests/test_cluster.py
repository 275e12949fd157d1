"""The SLURM side that needs no SLURM: cluster YAML checks, the sbatch script submitit would
write, the plan and its FLOP counts, GPU claiming in the one-allocation mode, the CUDA switches
on a CPU, and the pinned environment lines agreeing across files. (tests/test_slurm.py runs the
same code against a real SLURM.)"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import submitit
import yaml
from helpers import run_cli

from pipeline.dispatch import (
    DispatchError,
    apply_parameters,
    load_cluster_config,
    stage_parameters,
    submitit_parameters,
)
from pipeline.flops import StageCost, estimate_seconds, stage_cost
from pipeline.plan import format_plan, plan_rows

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
BR200 = ROOT / "cluster" / "bigred200"
#: a stage entry for a quarter of a Big Red 200 GPU node: one A100, 16 cores, 60 GB
QUARTER_NODE = {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 16, "mem_per_gpu_gb": 60}


def write_cluster(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cluster.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def sbatch_text(sub: dict, tmp_path: Path) -> str:
    """The sbatch script submitit would write for these parameters, set as
    pipeline.dispatch.submit_stage sets them (``apply_parameters``)."""
    ex = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    apply_parameters(ex, sub)
    return ex._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"gpus_per_node": "4"}, "defaults.gpus_per_node is '4'; expected int"),
        ({"mem_gb": 10, "mem_per_gpu_gb": 5}, "sets both mem_gb and mem_per_gpu_gb"),
        ({"mail_type": "END,SOMETIMES"}, "mail_type has ['SOMETIMES']"),
        ({"srun_args": ["--cpu-bind=cores", 3]}, "srun_args must be a list of strings"),
        ({"exclusive": 1}, "defaults.exclusive is 1; expected bool or str"),
        ({"gpus": 4}, "unknown keys ['gpus']"),
    ],
)
def test_cluster_yaml_errors_name_the_file_and_key(tmp_path, entry, message):
    path = write_cluster(tmp_path, {"defaults": entry})
    with pytest.raises(DispatchError) as err:
        load_cluster_config(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_unknown_stage_in_cluster_yaml_is_refused(tmp_path):
    path = write_cluster(tmp_path, {"stages": {"train_difusion": {"timeout_min": 10}}})
    with pytest.raises(DispatchError, match=r"unknown stages \['train_difusion'\]"):
        load_cluster_config(path)


def test_sbatch_options_reach_the_script_and_memory_follows_the_gpus(tmp_path):
    path = write_cluster(
        tmp_path,
        {
            "defaults": {
                **QUARTER_NODE,
                "mail_type": "END,FAIL",
                "mail_user": "me@iu.edu",
                "additional_parameters": {"hint": "nomultithread"},
                "srun_args": ["--cpu-bind=cores"],
            },
            "stages": {"train_diffusion": {"gpus_per_node": 4, "exclusive": True}, "sample": {"mem_gb": 20}},
        },
    )
    cluster = load_cluster_config(path)
    ddp = submitit_parameters(stage_parameters(cluster, "train_diffusion"), "r-train_diffusion", "r00000", ["true"])
    text = sbatch_text(ddp, tmp_path)
    for line in (
        "#SBATCH --mem=240GB",  # 4 GPUs x 60 GB: the node's memory, not one GPU's
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mail-type=END,FAIL",
        "#SBATCH --mail-user=me@iu.edu",
        "#SBATCH --exclusive",
        "#SBATCH --hint=nomultithread",
        "#SBATCH --account=r00000",
        "#SBATCH --job-name=r-train_diffusion",
    ):
        assert line in text, line
    assert "--wckey" not in text  # submitit's default --wckey=submitit is not sent
    assert re.search(r"^srun .* --cpu-bind=cores ", text, re.M)
    one = submitit_parameters(stage_parameters(cluster, "train_vqvae"), "r-train_vqvae", "r00000", None)
    assert one["mem_gb"] == 60 and one["tasks_per_node"] == 1
    # a stage's own memory key replaces the defaults' (no mem_per_gpu_gb left over)
    sample = submitit_parameters(stage_parameters(cluster, "sample"), "r-sample", "r00000", None)
    assert sample["mem_gb"] == 20
    with_key = write_cluster(tmp_path, {"defaults": {"wckey": "proj1"}})
    sub = submitit_parameters(stage_parameters(load_cluster_config(with_key), "sample"), "r", "a", None)
    assert "#SBATCH --wckey=proj1" in sbatch_text(sub, tmp_path)


def test_the_bigred200_cluster_yaml_is_valid_and_sized_for_its_nodes():
    cluster = load_cluster_config(BR200 / "slurm.yaml")
    for stage in ("train_vqvae", "train_diffusion", "sample", "evaluate"):
        params = stage_parameters(cluster, stage)
        gpus = params["gpus_per_node"]
        assert params["partition"] == "gpu" and gpus * params["cpus_per_task"] <= 64
        assert submitit_parameters(params, "x", "a", None)["mem_gb"] <= 256
    four = submitit_parameters({**stage_parameters(cluster, "train_diffusion"), "gpus_per_node": 4}, "x", "a", None)
    assert four["mem_gb"] == 240 and four["tasks_per_node"] == 4


def test_the_pinned_module_line_is_the_same_everywhere():
    env_sh = (BR200 / "env.sh").read_text()
    module = re.search(r'^VQLP_MODULE="([^"]+)"', env_sh, re.M).group(1)
    assert re.fullmatch(r"python/gpu/\d+\.\d+\.\d+", module)  # a version, not the moving default
    setup = load_cluster_config(BR200 / "slurm.yaml")["setup"]
    assert setup == [f"module load {module}"]
    docs = (ROOT / "docs" / "cluster.md").read_text() + (ROOT / "README.md").read_text()
    loads = set(re.findall(r"module load ([\w/.-]+)", docs))
    assert loads == {module}, loads
    assert "|| true" not in (BR200 / "slurm.yaml").read_text()
    for wrapper in ("run_pipeline.sbatch", "run_stage.sbatch", "run_allocation.sbatch"):
        assert "source cluster/bigred200/env.sh" in (BR200 / wrapper).read_text(), wrapper
    cuda_env = (ROOT / "envs" / "cuda.yaml").read_text()
    assert re.search(r"^\s*- torch==2\.13\.0(\s|$)", cuda_env, re.M), "envs/cuda.yaml pins the torch that is tested"


def test_flops_scale_with_steps_batch_and_guidance():
    from pipeline.config import load_default

    cfg = load_default()
    base = stage_cost("train_diffusion", cfg)
    double = stage_cost("train_diffusion", {**cfg, "diffusion": {**cfg["diffusion"], "steps": 3200}})
    assert base.flops > 0 and double.flops == pytest.approx(2 * base.flops)
    wide = stage_cost("train_diffusion", {**cfg, "diffusion": {**cfg["diffusion"], "batch_size": 128}})
    assert wide.flops == pytest.approx(2 * base.flops, rel=1e-6)
    # the variant reads its own steps: conditional_steps
    cond = stage_cost("train_diffusion", cfg, conditional=True)
    assert cond.flops == pytest.approx(base.flops * 1000 / 1600, rel=1e-3)
    plain = stage_cost("sample", cfg, sample_sets=["diffusion_dpmsde"])
    guided = stage_cost("sample", cfg, sample_sets=["diffusion_dpmsde_ag2"])
    pc = stage_cost("sample", cfg, sample_sets=["pixelcnn"])
    pc_ag = stage_cost("sample", cfg, sample_sets=["pixelcnn_ag1.5"])
    assert 1.9 < guided.flops / plain.flops < 2.0  # two networks per step, one decoder per image
    assert 1.9 < pc_ag.flops / pc.flops < 2.0
    both = stage_cost("sample", cfg, sample_sets=["pixelcnn", "diffusion_dpmsde"])
    assert both.flops == pytest.approx(pc.flops + plain.flops)
    # the time model: start-up plus the larger of arithmetic and latency
    cost = StageCost(flops=6e15, calls=1000, detail="")
    assert estimate_seconds(cost, tflops=60, step_ms=3, startup_s=0) == pytest.approx(100.0)
    assert estimate_seconds(StageCost(6e12, 100000, ""), 60, 3, startup_s=0) == pytest.approx(300.0)


def test_plan_rows_from_commands_give_resources_and_gpu_hours(tmp_path):
    import json

    cluster = write_cluster(
        tmp_path,
        {
            "defaults": {
                **QUARTER_NODE,
                "timeout_min": 1,
                "assumed_tflops": 0.001,
            },
            "stages": {"train_diffusion": {"gpus_per_node": 2, "timeout_min": 600}},
        },
    )
    from pipeline.config import load_default, stage_view

    cfg = load_default()
    view = json.dumps(stage_view(cfg, "train_diffusion"))
    submit = f"--submit --cluster-config {cluster} --account r00000"
    commands = [
        f"train_diffusion --run results/x --threads 1 --config-json '{view}' {submit}",
        f"sample --sample-set pixelcnn --sample-set diffusion_dpmsde --run results/x {submit}",
        "timings --run results/x",
    ]
    from pipeline.cli import build_parser

    rows = plan_rows(commands, cfg, build_parser())
    diff, sample, timings = rows
    assert (diff.job, diff.where, diff.gpus, diff.cpus, diff.mem_gb, diff.account) == (
        "x-train_diffusion",
        "SLURM",
        2,
        16,
        120.0,
        "r00000",
    )
    assert diff.gpu_hours == pytest.approx(diff.est_s * 2 / 3600) and diff.max_gpu_hours == pytest.approx(20.0)
    assert sample.job == "x-sample" and "pixelcnn 500 x" in sample.detail and "diffusion_dpmsde 500 x" in sample.detail
    assert timings.where == "here" and timings.gpu_hours == 0
    text = format_plan(rows)
    assert "| x-train_diffusion | SLURM | gpu | 2 | 16 | 120 | 600 | r00000 |" in text
    assert "WARNING: x-sample is estimated at" in text  # 0.001 TFLOP/s cannot draw 1,000 images in 1 minute


def test_plan_of_a_two_node_stage_counts_every_gpu_and_the_all_reduce(tmp_path):
    import json

    from pipeline.cli import build_parser
    from pipeline.config import load_default, stage_view
    from pipeline.flops import allreduce_seconds

    cfg = load_default()
    view = json.dumps(stage_view(cfg, "train_diffusion"))
    rows = {}
    for nodes in (1, 2):
        stage = {"nodes": nodes, "gpus_per_node": 4, "assumed_internode_gbps": 10}
        (tmp_path / str(nodes)).mkdir()
        cluster = write_cluster(tmp_path / str(nodes), {"defaults": QUARTER_NODE, "stages": {"train_diffusion": stage}})
        cmd = f"train_diffusion --run results/x --config-json '{view}' --submit --cluster-config {cluster}"
        rows[nodes] = plan_rows([cmd], cfg, build_parser())[0]
    one, two = rows[1], rows[2]
    assert (one.gpus, one.nodes, two.gpus, two.nodes) == (4, 1, 8, 2)
    assert one.comm_s == 0 and two.comm_s > 0
    steps = int(cfg["diffusion"]["steps"])
    params = stage_cost("train_diffusion", cfg).params
    assert params > 1e5
    assert two.comm_s == pytest.approx(steps * allreduce_seconds(params, 8, 2, 10))
    assert two.gpu_hours == pytest.approx(two.est_s * 8 / 3600)
    text = format_plan([one, two])
    assert "| x-train_diffusion | SLURM | gpu | 2x4 |" in text and "| x-train_diffusion | SLURM | gpu | 4 |" in text
    assert "all-reduce of the fp32 gradients" in text
    # a ring all-reduce sends 2 (n-1)/n of the gradients per rank; 4 ranks share a node's link
    assert allreduce_seconds(1_000_000, 8, 2, 8.0) == pytest.approx(2 * 7 / 8 * 4e6 * 4 / 1e9)
    assert allreduce_seconds(1_000_000, 4, 1, 8.0) == 0.0


def test_plan_command_prints_what_the_bigred200_profile_would_submit(tmp_path):
    proc = run_cli(
        "plan",
        "-d",
        str(tmp_path),
        "--profile",
        str(BR200),
        "--configfile",
        str(BR200 / "pipeline.yaml"),
        str(TINY),
        "--config",
        "slurm={account: r12345}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| tiny-train_vqvae | SLURM | gpu | 1 | 16 | 60 | 60 | r12345 |" in out
    assert "| tiny-train_diffusion | SLURM | gpu | 1 | 16 | 60 | 240 | r12345 |" in out
    assert "| tiny-prepare_data | here |" in out
    # the sample sets are one job; nothing was run or submitted
    assert len(re.findall(r"^\| tiny-sample", out, re.M)) == 1
    assert "GPU-hours" in out and not (tmp_path / "results").exists()


def test_plan_reports_a_failing_dry_run(tmp_path):
    proc = run_cli("plan", "-d", str(tmp_path), "--config", "vqvae={stepz: 3}", timeout=300)
    assert proc.returncode == 1 and "error: plan: snakemake dry run failed" in proc.stderr


def _claim(lock_dir: str, count: int, out: str) -> None:
    from pipeline.runtime import claim_gpu

    Path(out).write_text(str(claim_gpu(lock_dir, count, wait_s=0.5)))
    import time

    time.sleep(3)  # hold it while the others try


def test_concurrent_stages_claim_different_gpus(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_claim, args=(str(tmp_path / "locks"), 2, str(tmp_path / f"c{i}"))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    got = sorted((tmp_path / f"c{i}").read_text() for i in range(3) if (tmp_path / f"c{i}").is_file())
    assert got == ["0", "1"]  # two GPUs: two claims; the third found none free within 0.5 s
    assert sorted(p.exitcode for p in procs) == [0, 0, 1]


def test_cuda_switches_fall_back_cleanly_on_a_cpu():
    import torch

    from pipeline.runtime import autocast, configure_cuda, resolve_device, where_it_ran

    state = configure_cuda({"tf32": True, "cudnn_benchmark": True})
    assert state == {"tf32": False, "cudnn_benchmark": False, "cuda": False}
    dev = resolve_device("auto")
    assert dev.type == "cpu"
    with autocast(dev, bf16=False):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32  # bf16: true is CPU autocast too (tests/test_precision.py)
    where = where_it_ran()
    assert where["gpus"] is None and where["peak_gpu_memory_gb"] is None
    assert (where["slurm"] is None) == ("SLURM_JOB_ID" not in os.environ)


def test_gpu_preset_validates_and_switches_the_gpu_paths_on():
    from pipeline.config import resolve

    cfg = resolve([str(BR200 / "pipeline.yaml"), str(ROOT / "pipeline" / "configs" / "bigred200_full.yaml")])
    assert cfg["bf16"] and cfg["tf32"] and cfg["cudnn_benchmark"] and cfg["device"] == "cuda"
    assert cfg["data"]["source"] == "mnist" and cfg["data"]["download"]
    assert cfg["evaluate"]["num_images"] <= 10000  # the full test split
    assert cfg["slurm"]["enabled"] and cfg["sample"]["ddpm_num_samples"] is None


# --- the 3D T1 preset: FLOPs, GPU memory and the plan for 128³ volumes (issue #14) ------------
T1 = ROOT / "pipeline" / "configs" / "bigred200_t1.yaml"


def test_t1_preset_fits_one_a100_with_checkpointing_where_the_memory_needs_it():
    from pipeline.config import resolve
    from pipeline.flops import stage_memory

    cfg = resolve([str(BR200 / "pipeline.yaml"), str(T1)])
    assert cfg["data"]["source"] == "nifti" and cfg["data"]["volume_shape"] == [128, 128, 128] and cfg["bf16"]
    assert cfg["slurm"]["cluster_config"] == "cluster/bigred200/slurm_t1.yaml"
    assert (ROOT / cfg["slurm"]["cluster_config"]).is_file()
    gpu = yaml.safe_load((ROOT / cfg["slurm"]["cluster_config"]).read_text())["defaults"]["gpu_memory_gb"]
    for stage in ("train_vqvae", "train_simclr", "train_pixelcnn", "train_diffusion"):
        cost, mem = stage_cost(stage, cfg), stage_memory(stage, cfg)
        assert cost.flops > 1e15 and mem.total < 0.9 * gpu, (stage, cost, mem)
    # the PixelCNN over the 32³ code grid needs its checkpointing: without it, past the 90 % the plan warns at
    pix = stage_memory("train_pixelcnn", cfg)
    assert pix.checkpointing and pix.states + pix.activations > 0.9 * gpu > 2 * pix.total
    # the diffusion sampler is thousands of times cheaper per volume than raster PixelCNN sampling
    pc, diff = (stage_cost("sample", cfg, sample_sets=[s]) for s in ("pixelcnn", "diffusion_dpmsde"))
    assert pc.flops > 1000 * diff.flops


def test_gpu_memory_scales_with_batch_precision_and_checkpointing():
    import torch

    from pipeline.config import resolve
    from pipeline.flops import _networks, _saved_elements, stage_memory

    vols = ["data.source=nifti", "data.path=none", "data.volume_shape=[16, 16, 8]", "vqvae.batch_size=4"]
    cfg = resolve(overrides=vols)
    base = stage_memory("train_vqvae", cfg)
    double = stage_memory("train_vqvae", {**cfg, "vqvae": {**cfg["vqvae"], "batch_size": 8}})
    bf16 = stage_memory("train_vqvae", {**cfg, "bf16": True})
    two_gpus = stage_memory("train_vqvae", cfg, gpus=2)
    assert double.activations == pytest.approx(2 * base.activations, rel=0.01)
    assert bf16.activations == pytest.approx(base.activations / 2) and two_gpus.batch_per_gpu == 2
    assert base.activations_checkpointed < base.activations and base.states == pytest.approx(base.params * 16 / 2**30)
    # the meta device counts what real tensors save
    for device in ("meta", "cpu"):
        with torch.device(device):
            _, (net, batch, loss, _) = _networks("train_vqvae", cfg, {})
            net.quantizer.eval()  # the EMA update does not run on meta tensors
            counts = _saved_elements(net, batch(4), loss, net.checkpoint_regions())
        if device == "meta":
            meta = counts
    assert counts == meta
    assert stage_memory("sample", cfg) is None


def test_plan_of_the_t1_preset_prints_gpu_hours_and_warns_about_memory(tmp_path):
    args = ["plan", "-d", str(tmp_path), "--profile", str(BR200), "--configfile", str(BR200 / "pipeline.yaml"), str(T1)]
    proc = run_cli(*args, "--config", "slurm={account: r12345}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    row = re.search(
        r"^\| t1_128-train_pixelcnn \| SLURM \| gpu \| 1 \| 16 \| 60 \| 480 \| r12345 \|.*\| ([\d.]+) \|$", out, re.M
    )
    assert row and float(row.group(1)) < 36, out
    hours = float(re.search(r"estimated ([\d.]+) GPU-hours", out).group(1))
    assert 1 < hours < 100 and "WARNING" not in out and "GPU mem" in out
    proc = run_cli(*args, "--config", "pixelcnn={gradient_checkpointing: false}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        r"WARNING: t1_128-train_pixelcnn needs about [\d.]+ GiB per GPU, over 90% of the 40 GB GPU: "
        r"set pixelcnn.gradient_checkpointing: true",
        proc.stdout,
    ), proc.stdout
