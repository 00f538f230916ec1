"""launch/cluster-gpu.yaml against the cluster schema shipped in the installed ray package."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "launch" / "cluster-gpu.yaml"


def ray_schema() -> dict:
    import ray

    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not path.exists():
        pytest.skip(f"this ray ({ray.__version__}) ships no autoscaler/ray-schema.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_matches_rays_cluster_schema(cluster):
    import jsonschema

    jsonschema.validate(cluster, ray_schema())


def test_rays_own_validator_accepts_it(cluster):
    # What `ray up` does first: fill in the provider's defaults, then validate (schema + its own
    # cross-field rules: head type exists, node types' worker bounds, docker section).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_rejects_a_typo(cluster):
    import jsonschema

    bad = dict(cluster, idle_timeout_minute=5)
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(bad, ray_schema())


def test_cpu_head_autoscaled_gpu_workers(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpu = [t for name, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker node type"
    for t in gpu:
        assert 0 <= t["min_workers"] < t["max_workers"] <= cluster["max_workers"]
    assert cluster["idle_timeout_minutes"] > 0


def test_image_commands_and_no_credentials(cluster):
    import ray

    manifests = (REPO / "launch" / "kuberay" / "raycluster.yaml").read_text()
    image = cluster["docker"]["image"]
    assert f"image: {image}" in manifests  # one image for every launch path
    assert not image.endswith(":latest")
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start  # autoscaler runs on head
    assert "--dashboard-host=127.0.0.1" in head_start  # reached through `ray dashboard`'s SSH tunnel
    assert "$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])
    assert f"'{ray.__version__}'" in " ".join(cluster["setup_commands"])
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"(?i)aws_secret_access_key|aws_access_key_id\s*[:=]", text)
