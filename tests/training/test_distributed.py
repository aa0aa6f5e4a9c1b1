"""The training loop under torchrun: 2 CPU processes, gloo backend, DDP through accelerate.

distributed_worker.py trains a dense tiny Llama (causal-LM loss), its upcycled MoE (moe_loss_fn: LM + balance +
z-loss) and its mask model (train_masks: Lagrangian multipliers updated in after_step) on both ranks. Here the ranks
are compared with each other and with one process that takes each step on both ranks' blocks at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training import distributed_worker as worker
from upcycle.moe.train import moe_loss_fn
from upcycle.training.loop import causal_lm_loss, train

WORKER = Path(worker.__file__)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    """Launch the worker on 2 CPU processes once; {run name: [rank 0 results, rank 1 results]}."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", UPCYCLE_NO_PROGRESS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]
            for name in ("lm", "moe", "masks")}


def replay_both_ranks(loss_fn, ranks: list[dict], shards: bool):
    """A loss_fn for one process that ignores the blocks the loop draws and, at step s, uses what ranks 0 and 1
    drew at s: concatenated into one batch, or (shards=True) as two batches whose losses and metrics are averaged,
    which is what DDP's gradient averaging computes when the loss is not a plain token mean (the MoE's
    balance loss is a per-batch statistic on each process)."""
    step = iter(range(len(ranks[0]["drawn"])))

    def replay(model, inputs, _labels):
        s = next(step)
        batches = [tuple(t.to(inputs.device) for t in rank["drawn"][s]) for rank in ranks]
        if not shards:
            return loss_fn(model, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        results = [loss_fn(model, *batch) for batch in batches]
        metrics = {key: sum(m[key] for _, m in results) / 2 for key in results[0][1]}
        return sum(loss for loss, _ in results) / 2, metrics

    return replay


def reference_run(build, loss_fn, ranks: list[dict], lr: float, shards: bool):
    model, params = build(), []
    torch.testing.assert_close(worker.trainable(model), ranks[0]["initial"], rtol=0, atol=0)
    result = train(model, worker.pattern_blocks(), worker.train_config(len(ranks[0]["params"]), lr),
                   loss_fn=replay_both_ranks(loss_fn, ranks, shards),
                   after_step=lambda step, record: params.append(worker.trainable(model)))
    return result, params


@pytest.mark.parametrize("name", ["lm", "moe"])
def test_ddp_step_equals_one_process_on_both_ranks_blocks(ranks, name, one_torch_thread):
    first, second = ranks[name]
    steps = len(first["params"])
    assert steps == 6
    assert not any(torch.equal(a[0], b[0]) for a, b in zip(first["drawn"], second["drawn"])), "ranks drew alike"
    for step in range(steps):  # gradients were all-reduced: both replicas take the same step, bit for bit
        torch.testing.assert_close(first["params"][step], second["params"][step], rtol=0, atol=0)
    assert first["history"] == second["history"]  # the logged metrics are the mean over both processes

    if name == "lm":
        result, params = reference_run(worker.tiny_llama, causal_lm_loss, ranks[name], 1e-2, shards=False)
    else:
        result, params = reference_run(worker.tiny_moe, moe_loss_fn(worker.moe_config()), ranks[name], 1e-2,
                                       shards=True)
    for step in range(steps):
        torch.testing.assert_close(first["params"][step], params[step], rtol=1e-7, atol=1e-9,
                                   msg=f"{name} step {step + 1}")
        for key, value in result.history[step].items():
            assert first["history"][step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, step, key)

    losses = [record["loss"] for record in first["history"]]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses
    if name == "moe":  # the aux losses were part of the step
        assert all(record["aux_loss"] > 0 and record["moe/z_loss"] > 0 for record in first["history"])


def test_mask_training_keeps_multipliers_in_sync(ranks):
    first, second = ranks["masks"]
    assert first["lagrangian"]["step"] == 4
    assert first["lagrangian"] == second["lagrangian"]  # ascended on the all-reduced expected active ratio
    torch.testing.assert_close(first["params"], second["params"], rtol=0, atol=0)
    assert first["history"] == second["history"]
    assert first["lagrangian"]["lambda1"] != 0.0  # the multipliers did move
