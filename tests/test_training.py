"""The training library (pipeline/training.py) on its own: data order, LR schedule, EMA warm-up and
the loop's exact resume, on a model small enough to train in milliseconds."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.training import Batcher, TrainLoop, TrainResult, ema_avg_fn, guide_step, lr_lambda, train_loop


def test_batcher_is_a_seeded_permutation_per_epoch_and_a_function_of_the_step():
    b = Batcher(10, 3, seed=7)
    assert b.steps_per_epoch == 3
    epoch0 = torch.cat([b(s) for s in range(3)])
    assert len(set(epoch0.tolist())) == 9 and epoch0.max() < 10  # 9 distinct of the 10, no repeats
    again = Batcher(10, 3, seed=7)
    assert torch.equal(again(4), b(4)) and torch.equal(again(1), b(1))  # any order of calls
    assert not torch.equal(Batcher(10, 3, seed=8)(0), b(0))
    assert not torch.equal(b(3), b(0))  # epoch 1 is another permutation
    assert len(Batcher(4, 64, seed=0)(0)) == 4  # a batch larger than the data is clipped
    with pytest.raises(ValueError, match="empty dataset"):
        Batcher(0, 4, seed=0)


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    f = lr_lambda(total=110, warmup=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    decay = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))


def test_ema_warm_up_by_hand():
    avg_fn = ema_avg_fn(0.999)
    avg, cur = torch.tensor([1.0]), torch.tensor([3.0])
    # after n updates d = min(0.999, (1 + n) / (10 + n)): 0.1 at n = 0, 0.991 at n = 1000, 0.999 from n = 8991
    assert float(avg_fn(avg, cur, torch.tensor(0))) == pytest.approx(0.1 * 1 + 0.9 * 3)
    assert float(avg_fn(avg, cur, torch.tensor(1000))) == pytest.approx(1001 / 1010 * 1 + 9 / 1010 * 3)
    assert float(avg_fn(avg, cur, torch.tensor(100_000))) == pytest.approx(0.999 * 1 + 0.001 * 3)


def test_guide_step_is_a_fraction_of_the_steps():
    assert guide_step({"steps": 1600, "guide_fraction": 0.25}) == 400
    assert guide_step({"steps": 3, "guide_fraction": 0.01}) == 1
    assert guide_step({"steps": 100, "guide_fraction": 0}) is None and guide_step({"steps": 100}) is None


def _problem(seed: int):
    """The same data every time; the model's initial weights from ``seed``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1)

    def compute_loss(net, idx, shard):
        noise = shard(torch.randn(len(idx), 1)) * 0.01  # per-step randomness from the global RNG
        return torch.nn.functional.mse_loss(net(x[idx]) + noise, y[idx]), {"bias": net.bias.detach().sum()}

    return model, compute_loss


SECTION = {"steps": 40, "batch_size": 8, "lr": 0.05, "seed": 3, "log_every": 10, "checkpoint_every": 20}


def _run(tmp_path, seed, **kw):
    model, compute_loss = _problem(seed)
    loop = TrainLoop(
        stage="toy",
        model=model,
        kind="linear",
        model_args={"n": 3},
        section=kw.pop("section", SECTION),
        compute_loss=compute_loss,
        n_data=64,
        out_dir=tmp_path,
        device=torch.device("cpu"),
        **kw,
    )
    return model, loop.run()


def test_loop_trains_logs_and_returns_a_typed_result(tmp_path):
    model, res = _run(tmp_path, 0, ema_decay=0.9, guide_step=10)
    assert isinstance(res, TrainResult)
    assert [r["step"] for r in res.rows] == [10, 20, 30, 40] and set(res.rows[0]) == {"step", "lr", "loss", "bias"}
    assert res.rows[-1]["loss"] < res.rows[0]["loss"] / 4 and res.final_loss == res.rows[-1]["loss"]
    assert res.elapsed_s > 0 and res.resumed_s == 0.0
    assert res.ema is not None and res.guide is not None and set(res.guide) >= {"weight", "bias"}
    assert not torch.equal(res.guide["weight"], res.ema.module.weight)  # taken at step 10, not 40
    csv = (tmp_path / "train_log.csv").read_text().splitlines()
    assert csv[0] == "step,lr,loss,bias" and len(csv) == 5
    assert (tmp_path / "checkpoint.pt").exists()  # the step-20 checkpoint (the stage removes it)


def test_resume_continues_exactly_where_the_checkpoint_left_off(tmp_path):
    straight, _ = _run(tmp_path / "a", 0, ema_decay=0.9, guide_step=30)
    # b: the same run stopped at its step-20 checkpoint, then resumed by a new process whose model
    # starts from other weights: the resumed run must end on the same weights, bit for bit
    (tmp_path / "b").mkdir()
    _run(tmp_path / "b", 0, section={**SECTION, "steps": 40, "checkpoint_every": 20}, ema_decay=0.9, guide_step=30)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 20
    resumed, res = _run(tmp_path / "b", 123, ema_decay=0.9, guide_step=30)
    assert res.resumed_s > 0 and [r["step"] for r in res.rows] == [10, 20, 30, 40]
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path):
    _run(tmp_path, 0)
    other = {**SECTION, "lr": 0.01}
    _, res = _run(tmp_path, 0, section=other)
    assert res.resumed_s == 0.0 and [r["step"] for r in res.rows] == [10, 20, 30, 40]


def test_train_loop_is_the_one_call_form(tmp_path):
    model, compute_loss = _problem(1)
    res = train_loop(
        stage="toy",
        model=model,
        kind="linear",
        model_args={"n": 3},
        section={**SECTION, "steps": 5, "log_every": 5},
        compute_loss=compute_loss,
        n_data=64,
        out_dir=tmp_path,
        device=torch.device("cpu"),
    )
    assert res.ema is None and res.guide is None and len(res.rows) == 1 and math.isfinite(res.final_loss)


def _ddp_rank(rank: int, world: int, init: str, out: str, signal_rank: int) -> None:
    """One rank of a 2-process gloo group: ``signal_rank`` receives SLURM's pre-timeout signal
    (SIGUSR2) during step 5; the other rank never sees it."""
    import json
    import os
    import signal
    from pathlib import Path

    from pipeline import runtime

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    events = []

    def hook(signum):  # stands in for submitit's checkpoint-and-requeue (pipeline.dispatch)
        events.append({"rank": rank, "hook": int(signum), "checkpoint": (Path(out) / "checkpoint.pt").exists()})
        raise SystemExit(0)

    runtime.set_requeue_hook(hook, signals=(signal.SIGUSR2,))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)

    calls = [0]

    def loss_with_signal(net, idx, shard):
        calls[0] += 1
        if calls[0] == 5 and rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR2)
        return torch.nn.functional.mse_loss(net(shard(x[idx])), shard(y[idx])), {}

    loop = TrainLoop(
        stage="toy",
        model=model,
        kind="linear",
        model_args={"n": 3},
        section=SECTION,
        compute_loss=loss_with_signal,
        n_data=64,
        out_dir=Path(out),
        device=torch.device("cpu"),
    )
    try:
        loop.run()
        events.append({"rank": rank, "hook": None})
    except SystemExit:
        pass
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(events))
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("signal_rank", [0, 1])
def test_ddp_ranks_agree_to_requeue_when_only_one_sees_the_signal(tmp_path, signal_rank):
    """The rank that has not (yet) seen SLURM's pre-timeout signal must checkpoint-and-requeue with
    the other, not exit 143 on its own; and no rank leaves before rank 0's checkpoint is on disk."""
    import json

    import torch.multiprocessing as mp

    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_ddp_rank, args=(2, init, str(tmp_path), signal_rank), nprocs=2, start_method="spawn")
    events = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    import signal

    assert events == [
        [{"rank": 0, "hook": int(signal.SIGUSR2), "checkpoint": True}],
        [{"rank": 1, "hook": int(signal.SIGUSR2), "checkpoint": True}],
    ]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5  # both stopped at the same step boundary, after the step that saw it
