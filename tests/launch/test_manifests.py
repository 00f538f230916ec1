"""KubeRay manifests: validated against the RayCluster / RayJob CRD schemas (strict), plus the
Kubernetes rules jsonschema cannot express (requests == limits, non-root, secrets, /dev/shm)."""

from __future__ import annotations

import copy
import functools
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "launch" / "kuberay"
SCHEMA_DIR = REPO.parent / "shared" / "schemas" / "kuberay"
SECRET_NAME = "stackrec-s3"
QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
SHELL_OPERATORS = ("&&", "||", ";", "|", ">", "<", "$(", "`")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / name).read_text())


def crd_schema(filename: str, version: str = "v1") -> dict[str, Any]:
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMA_DIR} (expected ../shared/schemas/kuberay next to the repo)")
    return copy.deepcopy(_crd_schema(filename, version))


@functools.lru_cache(maxsize=None)
def _crd_schema(filename: str, version: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load((SCHEMA_DIR / filename).read_text(), Loader=loader)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return entry["schema"]["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """Reject unknown fields, as `kubectl apply` (server-side field validation Strict) does.

    Structural CRD schemas prune unknown fields instead of rejecting them, so a misspelt key would
    validate and then silently vanish; closing every object that lists its properties catches it.
    """
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def validate(manifest: dict, filename: str) -> None:
    import jsonschema

    schema = strict(crd_schema(filename))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def pod_templates(manifest: dict) -> Iterator[tuple[str, dict]]:
    spec = cluster_spec(manifest)
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield f"worker:{group['groupName']}", group["template"]


MANIFESTS = [("raycluster.yaml", "ray.io_rayclusters.yaml"), ("rayjob.yaml", "ray.io_rayjobs.yaml")]


@pytest.mark.parametrize("name,crd", MANIFESTS)
def test_manifest_matches_crd_schema(name, crd):
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    validate(manifest, crd)


def test_strict_schema_catches_a_typo():
    manifest = load("raycluster.yaml")
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # should be maxReplicas
    with pytest.raises(AssertionError, match="maxReplica"):
        validate(manifest, "ray.io_rayclusters.yaml")


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_pods_are_guaranteed_non_root_and_well_formed(name):
    manifest = load(name)
    templates = list(pod_templates(manifest))
    if manifest["kind"] == "RayJob":
        templates.append(("submitter", manifest["spec"]["submitterPodTemplate"]))
    for where, template in templates:
        pod = template["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, where
        assert psc.get("runAsUser") == 1000, where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        names = [c["name"] for c in pod["containers"]]
        assert len(names) == len(set(names)), where
        for c in pod["containers"]:
            at = f"{where}/{c['name']}"
            res = c["resources"]
            assert res["requests"] == res["limits"], f"{at}: requests != limits"
            assert {"cpu", "memory"} <= set(res["limits"]), at
            for key, value in res["limits"].items():
                assert QUANTITY.match(str(value)), f"{at}: bad quantity {key}={value}"
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000, at
            assert sc["allowPrivilegeEscalation"] is False, at
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), at
            assert sc.get("privileged", False) is False, at
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", at
            assert c["image"] == IMAGE and not c["image"].endswith(":latest"), at
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{at}: mount of undefined volume {m['name']}"
            ports = [p["containerPort"] for p in c.get("ports", [])]
            assert len(ports) == len(set(ports)), at
    asc = cluster_spec(manifest).get("autoscalerOptions")
    if asc:
        assert asc["resources"]["requests"] == asc["resources"]["limits"]
        assert asc["securityContext"]["runAsNonRoot"] is True
        assert asc["securityContext"]["allowPrivilegeEscalation"] is False


IMAGE = "registry.example.com/stackrec/stackrec-dist:0.1.0-gpu"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_ray_pods_have_gpus_secrets_and_shm(name):
    manifest = load(name)
    spec = cluster_spec(manifest)
    import ray

    assert spec["rayVersion"] == ray.__version__  # image, client and cluster on one Ray version
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # job server reachable in-cluster
    head_res = head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_res  # CPU head
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"
    for g in gpu_groups:
        c = g["template"]["spec"]["containers"][0]
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)

    secret_keys = set(load("s3-secret.example.yaml")["stringData"])
    for where, template in pod_templates(manifest):
        pod = template["spec"]
        c = pod["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c.get("env", []) if "valueFrom" in e}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert refs[var]["name"] == SECRET_NAME, where
            assert refs[var]["key"] in secret_keys, where
            assert not refs[var].get("optional"), where
        assert refs["AWS_SESSION_TOKEN"].get("optional") is True
        # no credential is spelt out as a literal value anywhere
        assert not [e for e in c.get("env", []) if e["name"].startswith("AWS_") and "value" in e], where

        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/dev/shm" in mounts, where
        shm = {v["name"]: v for v in pod["volumes"]}[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory", where
        size = str(shm["emptyDir"]["sizeLimit"])
        assert QUANTITY.match(size), where
        mem_limit = c["resources"]["limits"]["memory"]
        assert _bytes(size) < _bytes(mem_limit), f"{where}: /dev/shm counts against the memory limit"


def _bytes(q: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * mult
    return float(q)


def test_rayjob_runs_stackrec_train_and_cleans_up():
    job = load("rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0
    entry = job["entrypoint"]
    assert not any(op in entry for op in SHELL_OPERATORS), "the submitter pod's shell would run it"
    argv = shlex.split(entry)
    assert argv[:3] == ["stackrec", "train", "--config"]
    config = argv[3]
    assert config.startswith("configs/") and (REPO / config).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    # The overrides name real fields with valid values (the project's own loader decides).
    from stackrec_dist.config import load_config

    cfg = load_config(REPO / config, overrides)
    assert cfg.train.device == "cuda"
    workers = load("rayjob.yaml")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in workers)
    assert cfg.distributed.num_workers == gpus  # one Ray Train worker per GPU
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/app"  # the Dockerfile's copy of the repo
    assert not any(k.startswith("AWS_") for k in runtime_env.get("env_vars", {}))  # secrets via Secret only


def test_secret_example_has_placeholders_only():
    secret = load("s3-secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == SECRET_NAME
    data = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(data)
    for key, value in data.items():
        assert "REPLACE_ME" in value or "example.com" in value, key
    assert "data" not in secret  # no base64 blobs that could hide a real key
