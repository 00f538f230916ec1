"""The driver of ``tests/growth/test_two_nodes.py``: one plan through ``run_plan`` on the two-node
cluster of ``$RAY_ADDRESS``, run on the head in a process of its own (pytest's own Ray, if any,
stays out of it).

Every worker group places Ray Train's rank 0 on the second node and the other rank on the head
(per-worker node labels; Ray Train 2.60 numbers ranks in placement order), so whatever rank 0 does
(tracking, recording stages) happens away from the driver's node.

    python -m tests.growth.two_node_driver <job config JSON> <LoopOptions JSON> <result JSON path>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def place_rank_zero_on_node_two() -> None:
    """Every ScalingConfig that ``train.ray_job.build_trainer`` makes gets one node label per worker."""
    import ray.train

    from tests.fixtures.two_nodes import LABEL

    make = ray.train.ScalingConfig

    def placed(**kwargs):
        others = [{LABEL: "head"}] * (kwargs["num_workers"] - 1)
        return make(**kwargs, label_selector=[{LABEL: "two"}, *others])

    ray.train.ScalingConfig = placed


if __name__ == "__main__":
    from stackrec_dist.config import config_from_dict
    from stackrec_dist.scenarios.plan import run_plan
    from stackrec_dist.train.loop import LoopOptions

    cfg = config_from_dict(json.loads(sys.argv[1]))
    options = LoopOptions.from_dict(json.loads(sys.argv[2]))
    place_rank_zero_on_node_two()
    result = run_plan(cfg, options=options)
    Path(sys.argv[3]).write_text(json.dumps(result))
