"""The pipeline against a real single-node SLURM on localhost (cluster/local/start-slurm.sh).

Skipped where no SLURM answers, except under CI=true, where a missing SLURM is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import pipeline_cmd, run_cli, snakemake_cmd

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
ACCOUNT = os.environ.get("VQLP_SLURM_ACCOUNT", "vqtest")
GPU_STAGES = [
    "train_vqvae",
    "extract_latents",
    "train_classifier",
    "train_pixelcnn",
    "train_diffusion",
    "train_diffusion_cond",
    "evaluate",
]
SLURM_MODELS = [
    "pixelcnn",
    "diffusion_ddim",
    "diffusion_ddim_g2",
]  # few sample sets keep the job count (and the test time) down; _g2 trains diffusion_cond/


def _slurm_up() -> bool:
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and bool(re.search(r"idle|mix|alloc", out.stdout)) and acct.returncode == 0


pytestmark = pytest.mark.slurm

if not _slurm_up():
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but no SLURM answers: .ci/run must start cluster/local/start-slurm.sh")
    pytest.skip("no SLURM on this machine (bash cluster/local/start-slurm.sh starts one)", allow_module_level=True)


def snakemake(workdir: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = snakemake_cmd(workdir, "--profile", ROOT / "cluster" / "local", *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def sacct(job_id: str, wait_s: float = 30) -> tuple[str, str]:
    """(job name, final state) of a job from the accounting database (which lags a little).

    A test SLURM started again on the same machine keeps its accounting database but counts job
    ids from the start, so an id can name jobs of earlier runs too: the newest record is taken.
    slurmdbd may first record a short job under the placeholder name ``allocation`` (seen on CI:
    job 39 read back as ``allocation``, later as ``tiny-sample_pixelcnn``), so that is waited out too."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "Submit,JobName,State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        _, name, state = max(line.split("|") for line in out.strip().splitlines())
        state = state.split()[0]
        settled = state not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") and name != "allocation"
        if settled or time.monotonic() > deadline:
            return name, state
        time.sleep(1)


def sbatch_wrapper(script: str, options: list[str], args: list[str], config: list[str], tmp_path: Path) -> str:
    """``sbatch --wait`` one of cluster/bigred200's wrappers from the repository root with sbatch
    ``options`` and the wrapper's own ``args`` + ``config``; asserts that it succeeded and ended
    COMPLETED in sacct, and returns its job id."""
    cmd = ["sbatch", "-A", ACCOUNT, "-p", "gpu", *options, "--wait", "-D", str(ROOT)]
    cmd += ["-o", str(tmp_path / "job-%j.out"), str(ROOT / "cluster" / "bigred200" / script), *args, *config]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    outs = list(tmp_path.glob("job-*.out"))
    assert proc.returncode == 0, (outs[0].read_text() if outs else proc.stderr)[-4000:]
    job = re.search(r"Submitted batch job (\d+)", proc.stdout).group(1)
    assert sacct(job)[1] == "COMPLETED"
    return job


def job_ids(log: Path) -> list[str]:
    return re.findall(r"submitted SLURM job (\d+)", log.read_text())


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("slurmwf")
    proc = snakemake(
        wd,
        "--configfile",
        str(ROOT / "cluster" / "local" / "pipeline.yaml"),
        str(TINY),
        "--config",
        f"slurm={{account: {ACCOUNT}}}",
        f"sample={{sets: [{', '.join(SLURM_MODELS)}]}}",
    )
    return wd, proc


def test_every_gpu_stage_is_its_own_slurm_job(slurm_run):
    wd, proc = slurm_run
    run = wd / "results" / "tiny"
    seen = {}
    for stage in GPU_STAGES + ["sample_sets"]:
        log = run / "logs" / f"{stage}.log"
        ids = job_ids(log)
        assert len(ids) == 1, f"{stage}: {log.read_text()[-1000:]}"
        name, state = sacct(ids[0])
        assert state == "COMPLETED", (stage, state)
        job_name = "tiny-sample" if stage == "sample_sets" else f"tiny-{stage}"
        assert name == job_name
        seen[stage] = ids[0]
        folder = "sample" if stage == "sample_sets" else stage
        assert list((run / "logs" / folder).glob("*/*_log.out")), f"no submitit log folder for {stage}"
    assert len(set(seen.values())) == len(seen)  # distinct jobs
    # prepare_data stayed local: no SLURM job in its log
    assert not job_ids(run / "logs" / "prepare_data.log")
    # the sample sets were drawn in the one sample job, each its own output and record
    for m in SLURM_MODELS:
        assert np.load(run / "samples" / f"{m}.npy").dtype == np.float32
        where = json.loads((run / "samples" / f"{m}.json").read_text())["where"]
        assert where["slurm"]["job_id"] == seen["sample_sets"] and where["slurm"]["job_name"] == "tiny-sample"
    # every stage records where it ran: its own job, partition, account, CPUs
    for stage, folder in [("train_vqvae", "vqvae"), ("train_diffusion", "diffusion"), ("evaluate", "report")]:
        record = json.loads((run / folder / ("record.json" if stage == "evaluate" else "metrics.json")).read_text())
        slurm = record["where"]["slurm"]
        assert (slurm["job_id"], slurm["job_name"], slurm["partition"], slurm["account"]) == (
            seen[stage],
            f"tiny-{stage}",
            "gpu",
            ACCOUNT,
        )
        assert slurm["cpus_per_task"] == "1" and record["where"]["gpus"] is None  # fake GPUs, CPU torch
    assert json.loads((run / "diffusion" / "metrics.json").read_text())["train_steps_per_s"] > 0


def test_one_sample_set_alone_is_its_own_job(slurm_run, tmp_path):
    wd, _ = slurm_run
    run = tmp_path / "tiny"
    shutil.copytree(wd / "results" / "tiny", run)
    before = (run / "samples" / "diffusion_ddim.json").read_text()
    proc = run_cli(
        "sample",
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--sample-set",
        "pixelcnn",
        "--submit",
        "--cluster-config",
        str(ROOT / "cluster" / "local" / "slurm.yaml"),
        "--account",
        ACCOUNT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    assert sacct(job) == ("tiny-sample_pixelcnn", "COMPLETED")
    assert json.loads((run / "samples" / "pixelcnn.json").read_text())["where"]["slurm"]["job_id"] == job
    assert (run / "samples" / "diffusion_ddim.json").read_text() == before  # the other sets untouched


def test_ddp_two_tasks_world_size_two(slurm_run, tmp_path):
    """train_diffusion with gpus_per_node: 2 runs 2 DDP tasks (gloo on CPU) and matches one process."""
    wd, _ = slurm_run
    run = tmp_path / "tiny"
    shutil.copytree(wd / "results" / "tiny", run)
    single = torch.load(run / "diffusion" / "model.pt", weights_only=True)
    cluster = tmp_path / "ddp.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {"defaults": {"partition": "gpu", "gpus_per_node": 2, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 10}}
        )
    )
    proc = run_cli(
        "train_diffusion",
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--submit",
        "--cluster-config",
        str(cluster),
        "--account",
        ACCOUNT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished (2 task(s))" in proc.stdout
    metrics = json.loads((run / "diffusion" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    ddp = torch.load(run / "diffusion" / "model.pt", weights_only=True)
    assert ddp["model"].keys() == single["model"].keys()
    for k, v in single["model"].items():
        assert ddp["model"][k].shape == v.shape
    # global-batch semantics: 2 ranks follow the single-process path up to reduction order
    diffs = [float((ddp["model"][k].float() - v.float()).abs().max()) for k, v in single["model"].items()]
    assert max(diffs) < 1e-3, max(diffs)


def test_failing_stage_fails_snakemake_with_state_and_log_tail(slurm_run, tmp_path):
    wd, _ = slurm_run
    shutil.copytree(wd / "results", tmp_path / "results")
    (tmp_path / "results" / "tiny" / "latents" / "latents.h5").write_bytes(b"not hdf5")  # breaks the trainers
    proc = snakemake(
        tmp_path,
        "--configfile",
        str(ROOT / "cluster" / "local" / "pipeline.yaml"),
        str(TINY),
        "--config",
        f"slurm={{account: {ACCOUNT}}}",
        f"sample={{sets: [{', '.join(SLURM_MODELS)}]}}",
        "--forcerun",
        "train_pixelcnn",
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"SLURM job \d+ ended in state FAILED", out), out[-3000:]
    assert "not a readable HDF5 file" in out  # the tail of the job's stderr
    # the concurrent diffusion job was cancelled when Snakemake stopped, not left running
    import time

    for _ in range(30):
        names = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
        if not any(n.startswith("tiny-") for n in names):
            break
        time.sleep(1)
    assert not any(n.startswith("tiny-") for n in names), names


def test_profile_without_account_fails_before_submitting(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_ACCOUNT"}
    cmd = snakemake_cmd(tmp_path, "--profile", ROOT / "cluster" / "local")
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "SLURM dispatch needs an account" in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()  # nothing ran, nothing was submitted
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before


def test_bigred200_profile_runs_with_local_slurm_standing_in(tmp_path):
    """The Big Red 200 profile itself, with only the per-stage SLURM sizes swapped for this node's."""
    site = ROOT / "cluster" / "bigred200" / "pipeline.yaml"
    cmd = snakemake_cmd(
        tmp_path,
        "--profile",
        ROOT / "cluster" / "bigred200",
        "--configfile",
        site,
        TINY,
        "--config",
        f"slurm={{account: {ACCOUNT}, cluster_config: cluster/local/slurm.yaml}}",
        "run=br200",
        "sample={sets: [diffusion_ddim_g2]}",
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "results" / "br200"
    ids = job_ids(run / "logs" / "train_diffusion_cond.log")  # the class-conditional variant, for the _g2 set
    assert sacct(ids[0]) == ("br200-train_diffusion_cond", "COMPLETED")
    assert (run / "timings.json").is_file() and (run / "report" / "metrics.json").is_file()


def test_run_stage_sbatch_quotes_arguments_and_checks_the_stage(tmp_path):
    script = ROOT / "cluster" / "bigred200" / "run_stage.sbatch"
    small = ["-A", ACCOUNT, "-p", "gpu", "-c", "1", "--mem=1G", "--gpus-per-node=1", "--wait", "-D", str(ROOT)]
    # an argument with spaces and a quote reaches Python as one value: the config check names it
    out = tmp_path / "stage-%j.out"
    proc = subprocess.run(
        [
            "sbatch",
            *small,
            "-o",
            str(out),
            str(script),
            "prepare_data",
            "--run",
            str(tmp_path / "r"),
            "--set",
            "run=it's a; test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0  # the job failed (exit 2 from the config check)
    text = next(tmp_path.glob("stage-*.out")).read_text()
    assert "config key 'run': \"it's a; test\" does not match" in text
    assert not (tmp_path / "r").exists()
    # a stage name that is not one of ours is refused before anything runs
    bad = subprocess.run(
        ["sbatch", *small, "-o", str(tmp_path / "bad-%j.out"), str(script), "train; rm -rf /"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0
    assert "unknown stage 'train; rm -rf /'" in next(tmp_path.glob("bad-*.out")).read_text()
    # and a real stage runs
    good = subprocess.run(
        [
            "sbatch",
            *small,
            "-o",
            str(tmp_path / "good-%j.out"),
            str(script),
            "prepare_data",
            "--run",
            str(tmp_path / "g"),
            "--configfile",
            str(TINY),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, next(tmp_path.glob("good-*.out")).read_text()
    assert (tmp_path / "g" / "data" / "dataset.h5").is_file()


def test_run_pipeline_sbatch_driver_submits_the_stages(tmp_path):
    """The driver wrapper as a SLURM job (1 CPU here) runs Snakemake, which submits each GPU stage."""
    wd = tmp_path / "wd"
    # -c 1 here, and the wrapper's --mem-per-cpu: that SLURM_MEM_PER_CPU must not reach the stages' jobs
    driver_id = sbatch_wrapper(
        "run_pipeline.sbatch",
        ["-c", "1", "--export", "ALL,VQLP_PROFILE=cluster/local"],
        ["-d", str(wd), "--configfile", "cluster/local/pipeline.yaml", str(TINY)],
        ["--config", "run=driver", "sample={sets: [pixelcnn]}"],
        tmp_path,
    )
    ids = job_ids(wd / "results" / "driver" / "logs" / "train_vqvae.log")
    assert sacct(ids[0]) == ("driver-train_vqvae", "COMPLETED") and ids[0] != driver_id
    assert (wd / "results" / "driver" / "samples" / "pixelcnn.png").is_file()
    # the stage's job saw its own SLURM variables, none of the driver's (submitit.helpers.clean_env)
    slurm = json.loads((wd / "results" / "driver" / "vqvae" / "metrics.json").read_text())["where"]["slurm"]
    assert slurm["job_id"] == ids[0] and slurm["job_name"] == "driver-train_vqvae"
    assert slurm["mem_per_cpu_mb"] is None and slurm["mem_per_node_mb"] == "2048"


LIMIT_SECONDS = 40  # of one-task compute: more than the first 1-minute run holds before its signal


@pytest.fixture(scope="module")
def limit_steps(slurm_run, tmp_path_factory) -> int:
    """Steps of tiny train_diffusion worth LIMIT_SECONDS of one CPU thread on this machine (a
    multiple of 100 for the log check, 500-4000). slurmctld checks time limits on a 30 s clock,
    so under a 1-minute limit the signal comes 5-35 s into each run and a run starts in ~20 s:
    the work must outlast the first run's 35 s, and every further 10 s of it costs another 30 s
    requeue. A fixed count cannot do both: 2,000 steps were 60 s at the 33 steps/s of one CI
    machine and 180 s (18 requeues, 9 min per test) at the 11 steps/s of another."""
    run = fresh_diffusion_run(slurm_run[0], tmp_path_factory.mktemp("rate") / "tiny")
    cmd = pipeline_cmd("train_diffusion", "--run", str(run), "--configfile", str(TINY), "--threads", "1")
    cmd += ["--set", "diffusion.steps=300", "--set", "diffusion.log_every=100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rate = json.loads((run / "diffusion" / "metrics.json").read_text())["train_steps_per_s"]
    return int(min(max(round(rate * LIMIT_SECONDS / 100) * 100, 500), 4000))


@pytest.mark.heavy
def test_time_limit_requeues_and_resumes(slurm_run, limit_steps, tmp_path):
    """A 1-minute limit and more compute than fits (:func:`limit_steps`): SLURM's pre-timeout
    signal makes the stage checkpoint between two steps, submitit requeues the job, and the stage
    resumes where it stopped, as often as needed."""
    run = fresh_diffusion_run(slurm_run[0], tmp_path / "tiny")
    job = train_diffusion_under_limit(run, tmp_path, gpus=1, timeout_min=1, steps=limit_steps)
    assert_requeued_and_resumed(run, job, steps=limit_steps)
    assert (run / "diffusion" / "model.pt").is_file()


def fresh_diffusion_run(finished: Path, run: Path) -> Path:
    """A copy of the finished tiny run at ``run`` without the latent diffusion model's outputs."""
    shutil.copytree(finished / "results" / "tiny", run)
    for f in ("model.pt", "metrics.json", "train_log.csv"):
        (run / "diffusion" / f).unlink()
    return run


def train_diffusion_under_limit(
    run: Path, tmp_path: Path, gpus: int, timeout_min: int, steps: int, wait_s: float = 1500
) -> str:
    """Submit ``steps`` steps of train_diffusion on ``gpus`` tasks under a ``timeout_min`` limit
    (SIGUSR2 25 s before it, up to 40 requeues) and wait; the job id of a run that succeeded."""
    entry = {"partition": "gpu", "gpus_per_node": gpus, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": timeout_min}
    cluster = tmp_path / f"limit_{gpus}x{timeout_min}.yaml"
    cluster.write_text(yaml.safe_dump({"max_num_timeout": 40, "defaults": {**entry, "signal_delay_s": 25}}))
    proc = subprocess.run(
        _train_diffusion_cmd(run, cluster, steps), capture_output=True, text=True, timeout=wait_s, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"finished ({gpus} task(s))" in proc.stdout
    return re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)


def assert_requeued_and_resumed(run: Path, job: str, steps: int) -> None:
    """The job caught SLURM's pre-timeout signal, checkpointed, was requeued, resumed, and ended
    COMPLETED with a training log continuous across the requeues."""
    logs = "".join(p.read_text() for p in (run / "logs" / "train_diffusion").glob("*/*_log.err"))
    assert "Caught signal SIGUSR2" in logs and "checkpoint saved at step" in logs
    assert re.search(rf"resumed from .* at step \d+/{steps}", logs)
    assert sacct(job)[1] == "COMPLETED"
    logged = [int(line.split(",")[0]) for line in (run / "diffusion" / "train_log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(100, steps + 1, 100))  # continuous across the requeues


def _train_diffusion_cmd(run: Path, cluster: Path, steps: int) -> list[str]:
    """``python -m pipeline train_diffusion`` of a copied tiny run for ``steps`` steps, submitted
    with the cluster YAML ``cluster`` (no periodic checkpoints: only the signal makes one)."""
    return pipeline_cmd(
        "train_diffusion",
        "--run",
        str(run),
        "--configfile",
        str(TINY),
        "--set",
        f"diffusion.steps={steps}",
        "--set",
        "diffusion.log_every=100",
        "--set",
        "diffusion.checkpoint_every=100000",
        "--submit",
        "--cluster-config",
        str(cluster),
        "--account",
        ACCOUNT,
    )


def two_rank_steps(limit_steps: int) -> int:
    """The steps of the two-rank requeue test: 70 % of :func:`limit_steps` (a multiple of 100,
    >= 500). Two ranks step at 1.3-2x the one-task time (half the batch each, one core each, an
    all-reduce per step): ~40 s of work, more than the ~15 s a run computes before its signal, and
    each further 15 s is one more ~40 s requeue (a two-node run streaming its rows took 11)."""
    return max(500, round(limit_steps * 0.7 / 100) * 100)


@pytest.fixture(scope="module")
def uninterrupted_two_ranks(slurm_run, limit_steps, tmp_path_factory) -> Path:
    """An uninterrupted run of :func:`two_rank_steps` train_diffusion steps on 2 DDP tasks of one
    node, in memory."""
    tmp = tmp_path_factory.mktemp("ddp_ref")
    run = fresh_diffusion_run(slurm_run[0], tmp / "tiny")
    train_diffusion_under_limit(run, tmp, gpus=2, timeout_min=10, steps=two_rank_steps(limit_steps))
    return run


def assert_same_weights(a_run: Path, b_run: Path) -> None:
    a = torch.load(a_run / "diffusion" / "model.pt", weights_only=True)
    b = torch.load(b_run / "diffusion" / "model.pt", weights_only=True)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.heavy
def test_two_nodes_streamed_and_requeued_train_the_one_node_weights(
    uninterrupted_two_ranks, slurm_run, limit_steps, tmp_path
):
    """DDP across nodes for real: the local SLURM's partition ``multi`` is two nodes (two slurmd
    on this host), and a stage with ``nodes: 2, gpus_per_node: 1`` runs one rank on each (the
    rendezvous at the first node, NODE_RANK 0 and 1). With the training rows streamed from HDF5
    (each rank loads its shard of each batch) and a 1-minute limit that requeues the job, the
    weights are bit-equal to the uninterrupted one-node, two-task, in-memory run: the same global
    batch semantics on one node or two, either data path, any number of requeues. (The same
    requeue of two ranks on one node was a test of its own, the one-task requeue is
    :func:`test_time_limit_requeues_and_resumes`; each cost 4-9 min of requeues on a slow machine.)"""
    run = fresh_diffusion_run(slurm_run[0], tmp_path / "two_nodes" / "tiny")
    entry = {"partition": "multi", "nodes": 2, "gpus_per_node": 1, "cpus_per_task": 1, "mem_gb": 2}
    cluster = tmp_path / "two_nodes.yaml"
    cluster.write_text(
        yaml.safe_dump({"max_num_timeout": 40, "defaults": {**entry, "timeout_min": 1, "signal_delay_s": 25}})
    )
    steps = two_rank_steps(limit_steps)
    cmd = _train_diffusion_cmd(run, cluster, steps) + ["--set", "data_loading=stream", "--set", "data_workers=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "finished (2 task(s))" in proc.stdout
    job = re.search(r"submitted SLURM job (\d+)", proc.stdout).group(1)
    assert_requeued_and_resumed(run, job, steps=steps)
    logs = "".join(p.read_text() for p in (run / "logs" / "train_diffusion").glob("*/*_log.err"))
    assert re.search(r"DDP rank 0 of 2: node vqn1 \(node rank 0 of 2\), local rank 0, gloo, rendezvous vqn1:\d+", logs)
    assert re.search(r"DDP rank 1 of 2: node vqn2 \(node rank 1 of 2\), local rank 0", logs)
    assert "stream path (data_loading: stream)" in logs
    metrics = json.loads((run / "diffusion" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["where"]["slurm"]["nodes"] == "vqn[1-2]"
    assert int(metrics["where"]["slurm"]["restart_count"]) >= 1
    assert_same_weights(uninterrupted_two_ranks, run)


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGINT"])
def test_a_dropped_session_or_ctrl_c_cancels_the_job(slurm_run, tmp_path, sig):
    import signal
    import time

    wd, _ = slurm_run
    run = tmp_path / "tiny"
    shutil.copytree(wd / "results" / "tiny", run)
    cluster = tmp_path / "c.yaml"
    cluster.write_text(
        yaml.safe_dump(
            {"defaults": {"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 10}}
        )
    )
    proc = subprocess.Popen(
        _train_diffusion_cmd(run, cluster, 10**6), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    job = None
    for line in proc.stdout:
        m = re.search(r"submitted SLURM job (\d+)", line)
        if m:
            job = m.group(1)
            break
    assert job, "no job id"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until it runs: a cancelled RUNNING job, not a pending one
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "RUNNING":
            break
        time.sleep(0.5)
    proc.send_signal(getattr(signal, sig))
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f"interrupted; cancelled SLURM job {job}" in rest
    deadline = time.monotonic() + 30
    while sacct(job) != ("tiny-train_diffusion", "CANCELLED") and time.monotonic() < deadline:
        time.sleep(1)  # accounting may first show a transient record of the cancelled allocation
    assert sacct(job) == ("tiny-train_diffusion", "CANCELLED")


def test_run_allocation_runs_the_chain_in_one_job(tmp_path):
    """The one-allocation wrapper: Snakemake inside one GPU job, every stage local to it."""
    wd = tmp_path / "wd"
    job = sbatch_wrapper(
        "run_allocation.sbatch",
        ["-c", "2", "--gpus-per-node=1", "--mem=3G"],
        ["-d", str(wd), "--configfile", "cluster/bigred200/allocation/pipeline.yaml", str(TINY)],
        ["--config", "run=alloc", "sample={sets: [pixelcnn, diffusion_ddim]}"],
        tmp_path,
    )
    run = wd / "results" / "alloc"
    assert (run / "report" / "summary.md").is_file() and (run / "samples" / "diffusion_ddim.png").is_file()
    assert not job_ids(run / "logs" / "train_diffusion.log")  # nothing submitted from inside
    for folder in ("vqvae", "pixelcnn", "diffusion"):
        where = json.loads((run / folder / "metrics.json").read_text())["where"]
        assert where["slurm"]["job_id"] == job and where["slurm"]["job_name"] == "vqlp-alloc"
    runs_of_name = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-S", "now-1hours", "-o", "JobName"], capture_output=True, text=True
    ).stdout.split()
    assert not any(n.startswith("alloc-") for n in runs_of_name)


# --- issue #21: the preflight inside a job, and no silent CPU in a GPU job --------------------
def test_doctor_runs_inside_a_job_with_gpus(tmp_path):
    """``python -m pipeline doctor`` inside a job given a (fake) GPU: SLURM and the account
    answer; torch sees no GPU, which is a warning with device: cpu said explicitly and a failure
    with device: auto."""
    import sys

    def job(device: str) -> tuple[subprocess.CompletedProcess, str]:
        out = tmp_path / f"doctor-{device}.out"
        doctor = f"{sys.executable} -m pipeline doctor --profile cluster/local --set slurm.account={ACCOUNT}"
        cmd = ["sbatch", "-A", ACCOUNT, "-p", "gpu", "--gpus-per-node=1", "-c", "1", "--mem=1G", "--wait"]
        cmd += ["-D", str(ROOT), "-o", str(out), "--wrap", f"{doctor} --set device={device}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return proc, out.read_text()

    proc, text = job("cpu")
    assert proc.returncode == 0, text
    assert re.search(r"^warn gpus +this job was given GPUs \(SLURM_JOB_GPUS=", text, re.M), text
    assert re.search(r"^ok   slurm ", text, re.M) and re.search(rf"^ok   account +{ACCOUNT}: user ", text, re.M)
    assert re.search(r"^ok   device +device: cpu -> CPU \(said explicitly\)", text, re.M), text
    proc, text = job("auto")
    assert proc.returncode != 0
    assert re.search(r"^fail device +device: auto: this SLURM job was given GPUs .* Fix: ", text, re.M), text


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a node where torch sees no GPU")
def test_a_stage_in_a_gpu_job_that_sees_no_cuda_fails_within_seconds(tmp_path, tiny_cfg):
    """A stage submitted with a GPU (cluster/local/slurm.yaml: gpus_per_node 1) and device: auto
    on this CPU-only node stops before it reads data, with the one line that says why, instead of
    training on the CPU until its time limit."""
    import time

    from pipeline.config import deep_merge
    from pipeline.dispatch import DispatchError, submit_stage

    cfg = deep_merge(tiny_cfg, {"device": "auto"})
    t0 = time.monotonic()
    with pytest.raises(DispatchError) as err:
        # the run folder has no dataset.h5: a stage that got past the device would fail on it instead
        submit_stage("train_vqvae", cfg, str(tmp_path / "run"), ROOT / "cluster" / "local" / "slurm.yaml", ACCOUNT)
    took = time.monotonic() - t0
    message = str(err.value)
    assert "ended in state FAILED" in message
    assert "this SLURM job was given GPUs (SLURM_JOB_GPUS=" in message, message[-3000:]
    assert f"torch {torch.__version__} (CPU-only build)" in message and "Fix: install a CUDA build" in message
    assert "dataset.h5" not in message.split("--- submitit ---")[0]  # it stopped before reading any data
    assert took < 90, took  # job start-up and Python imports; the stage itself never started
