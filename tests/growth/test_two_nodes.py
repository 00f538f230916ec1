"""A growth plan on two Ray nodes of this machine that share no disk (docs/distributed.md, "Two
nodes, no shared disk").

The cluster (``tests/fixtures/two_nodes.py``): a head and a second node, 1 CPU each, each with its
own Ray temp dir, ``TMPDIR`` and ``STACKREC_CACHE``; where the machine allows it (root), the second
node runs in a private mount namespace in which the head's directories are an empty tmpfs. The
driver runs on the head (``tests/growth/two_node_driver.py``). Ray Train's 2 workers are one per
node, rank 0 on the second node (away from the driver, so its tracking and stage records must
travel). Dataset and Ray checkpoints are on the S3 server only; the coordinator's run directory
(plan state, stage outputs, TensorBoard files) is a local directory of the driver's node by design
(the ledger writes it with local renames), so it lives on the head only.

The plan trains 2 blocks (4 steps), grows to 4 in place and trains one epoch. At the end of every
stage each worker empties its node's scratch (``STACKREC_WIPE_AT_STAGE_END``, set per node), and
mid-way through the last stage rank 0 (on the second node) dies after step 6; Ray restarts the
group, which asks the ledger on the head where to start and resumes the stage from its step-4
checkpoint on S3. It proves that:

* the run finishes: 4 blocks, test metrics of every test row, every stage recorded in order, each
  output verified by its manifest, the grown weights the trained ones stacked (adjacent, zero_new);
* the data cursor crossed nodes exactly once: the windows consumed in the interrupted stage, over
  both ranks, are one epoch's, none lost and none repeated;
* nothing needed later lived on a node: both nodes' scratch was emptied between stages, rank 0 ran
  on the second node each time (its start-up line is in that node's worker logs only), and yet
  rank 0's TensorBoard scalars are in the head's run directory;
* the checkpoints are on S3 (both ranks' ZeRO-2 shards and cursors), nowhere on a node's disk.

About 2-3 minutes on 2 shared cores (two Ray nodes, a worker group started twice).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from stackrec_dist.growth.ledger import PLAN_STATE, WIPE_ENV, verify_stage_output
from stackrec_dist.train.checkpoint import open_checkpoint
from tests.fixtures.two_nodes import REPO, RayNode, TwoNodes, start_two_nodes

pytestmark = pytest.mark.slow

FAIL_AT_STEP = 6  # of train-4, after its step-4 checkpoint; train-2 has 4 steps only
PLAN = [
    {"name": "train-2", "action": "train", "max_steps": 4, "eval_every": 2},
    {"name": "grow-4", "action": "grow"},
    {"name": "train-4", "action": "train", "epochs": 1, "eval_every": 4},
]
SEQUENCES = 120


def _job(prefix: str, storage_options: dict, run_dir: Path) -> dict:
    return {
        "name": "twonode",
        "data": {"path": f"{prefix}/data", "max_len": 10, "batch_size": 32, "shuffle_buffer": 32,
                 "storage_options": storage_options},
        "model": {"dim": 16, "num_blocks": 2},
        "optim": {"warmup_steps": 2},
        "eval": {"batch_size": 64},
        "growth": {"method": "adjacent", "alpha_policy": "zero_new"},
        "train": {"patience": 0, "progress": False, "checkpoint_dir": str(run_dir)},
        "distributed": {"num_workers": 2, "zero_stage": 2, "cpus_per_worker": 1, "storage_path": f"{prefix}/ray",
                        "max_failures": 1},
        "plan": PLAN,
    }


@pytest.fixture
def two_nodes():
    # Ray's socket paths must stay under 107 bytes: a short base under /tmp, not pytest's tmp_path.
    base = Path(tempfile.mkdtemp(prefix="stackrec-2n-", dir="/tmp"))
    wipe = {name: {WIPE_ENV: os.pathsep.join(map(str, RayNode(name, base / name).scratch))} for name in ("head", "two")}
    cluster = start_two_nodes(base, node_env=wipe)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_plan_on_two_nodes_without_shared_disk(two_nodes: TwoNodes, s3_server):
    from stackrec_dist.config import config_from_dict
    from stackrec_dist.data.loader import build_train_loader
    from stackrec_dist.data.storage import open_fs
    from stackrec_dist.data.synthetic import generate_sequence_dataset
    from stackrec_dist.train.batches import window_fingerprints
    from tests.train.test_distributed import _consumed
    from tests.train.test_tracking import read_events

    cluster, opts = two_nodes, s3_server.storage_options
    if not cluster.masked:
        warnings.warn("no private mount namespace here (needs root): the second node can see the head's "
                      "directories, so a worker writing the driver's run directory would go unnoticed")
    base = cluster.head.root.parent
    observe = base / "observe"  # test instruments both nodes reach: crash marker, consumed windows
    run_dir = cluster.head.root / "run"
    prefix = f"s3://{s3_server.bucket}/two-nodes-{uuid.uuid4().hex[:10]}"
    generate_sequence_dataset(f"{prefix}/data", num_sequences=SEQUENCES, num_items=50, seed=2, num_shards=2,
                              row_group_size=15, storage_options=opts)
    job = _job(prefix, opts, run_dir)
    options = {"consumed_log_dir": str(observe / "consumed"), "fail_at_step": FAIL_AT_STEP, "fail_rank": 0,
               "fail_marker": str(observe / "crashed")}
    sentinels = [Path(d) / "sentinel" for node in (cluster.head, cluster.two) for d in node.scratch]
    for path in sentinels:
        path.write_text("must be wiped between stages\n")

    out = observe / "result.json"
    observe.mkdir(parents=True, exist_ok=True)
    # Within pytest's 600 s, so that a hang shows the driver's output and the nodes are still stopped.
    driver = subprocess.run(
        [sys.executable, "-m", "tests.growth.two_node_driver", json.dumps(job), json.dumps(options), str(out)],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=420)
    assert driver.returncode == 0, driver.stdout[-4000:] + driver.stderr[-6000:]
    result = json.loads(out.read_text())

    # The run finished at 4 blocks and tested every test row.
    assert result["final_blocks"] == 4 and result["test/count"] == SEQUENCES
    assert 0 <= result["test/ndcg@5"] <= 1
    done = json.loads((run_dir / PLAN_STATE).read_text())["done"]
    assert [r["name"] for r in done] == ["train-2", "grow-4", "train-4"]
    assert [r["blocks"] for r in done] == [2, 4, 4]
    assert all(verify_stage_output(Path(r["output"])) and Path(r["output"]).is_relative_to(run_dir) for r in done)
    parent = open_checkpoint(run_dir / "train-2" / "final").model_state()
    grown = open_checkpoint(run_dir / "grow-4" / "grown").model_state()
    for i in range(2):
        torch.testing.assert_close(grown[f"blocks.{2 * i}.conv1.weight"], parent[f"blocks.{i}.conv1.weight"],
                                   rtol=0, atol=0)
        assert grown[f"blocks.{2 * i + 1}.alpha"].item() == 0.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["blocks"] for s in summary["stages"]] == [2, 4, 4]
    steps = {r["name"]: r["metrics"].get("steps") for r in done}
    assert steps["train-2"] == 4 and steps["train-4"] > FAIL_AT_STEP

    # Rank 0 died on the second node mid-stage, and each worker group had its rank 0 there.
    assert (observe / "crashed").read_text().startswith(f"rank 0 died after step {FAIL_AT_STEP}")
    started = "stackrec: twonode: 2 worker(s)"
    assert len(cluster.two.printed(started)) == 2, "rank 0 did not start twice on the second node"
    assert not cluster.head.printed(started)

    # Exactly once over the interrupted stage: one epoch's windows, over both ranks and the restart.
    data = config_from_dict(job).data
    expected = Counter()
    for batch in build_train_loader(data, "train", rank=0, world_size=1):
        expected.update(window_fingerprints(batch))
    _, consumed = _consumed(observe / "consumed")
    missing, repeated = expected - consumed, consumed - expected
    assert not missing and not repeated, f"{sum(missing.values())} windows lost, {sum(repeated.values())} repeated"

    # Nothing needed later lived on a node: both nodes' scratch was emptied, yet rank 0's tracking
    # (on the second node) is in the head's run directory, on one step axis across the growth.
    assert not [p for p in sentinels if p.exists()], "a node's scratch was never emptied"
    events = sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "rank 0's TensorBoard files are not in the driver's run directory"
    scalars, _ = read_events(events[0].parent)
    assert scalars["model/depth"] == [(0, 2.0), (4, 4.0)]
    assert max(step for step, _ in scalars["valid/ndcg@5"]) == 4 + steps["train-4"]

    # The checkpoints are on S3 (both ranks' parts), and no node holds one.
    fs, inside = open_fs(f"{prefix}/ray", opts)
    fs.invalidate_cache()
    names = Counter(p.rsplit("/", 1)[-1] for p in fs.find(inside))
    assert names["cursor-rank0.json"] >= 2 and names["cursor-rank1.json"] >= 2
    assert names["zero_pp_rank_1_mp_rank_00_optim_states.pt"] >= 2
    on_nodes = [p for node in (cluster.head, cluster.two) for p in node.root.rglob("cursor-rank*.json")]
    assert not on_nodes, f"checkpoint parts on a node's disk: {on_nodes}"
