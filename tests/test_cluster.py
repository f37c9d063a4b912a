"""The cluster deliverables: cluster.yaml against Ray's own schema, docker/Dockerfile, deploy/kuberay-rayjob.yaml.

Offline and fast: cluster.yaml goes through the same `prepare_config` + `validate_config` that `ray up` runs before
it talks to AWS (Ray's ray-schema.json, checked with jsonschema). No Kubernetes or KubeRay schema ships with the
installed packages, so the RayJob manifest is checked structurally.
"""

import copy
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
RAYJOB = ROOT / "deploy" / "kuberay-rayjob.yaml"
SHARED = "/home/ray/shared"  # EFS on every node of cluster.yaml
K8S_SHARED = "/mnt/shared"  # the ReadWriteMany claim on every pod of the RayJob
WORLD = {"0.0.0.0/0", "::/0"}

# Literal credentials: AWS key ids, the keys' names with a value, private keys, 40-character AWS-secret-like tokens.
CREDENTIAL_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)aws_?(secret_?access_?key|access_?key_?id|session_?token)\s*[:=]\s*\S+"),
    re.compile(r"(?i)secret_?access_?key\s*[:=]\s*\S+"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]*[A-Z])(?=[A-Za-z0-9/+=]*[a-z])(?=[A-Za-z0-9/+=]*[0-9])"
               r"[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
]


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_validate(config: dict) -> None:
    """What `ray up` does to a config before any cloud call: fill Ray's AWS defaults, then the schema + checks."""
    validate_config(prepare_config(copy.deepcopy(config)))


def rayjob_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]


def by_kind(kind: str) -> list[dict]:
    return [d for d in rayjob_docs() if d.get("kind") == kind]


def credentials_in(text: str) -> list[str]:
    return [m.group(0) for p in CREDENTIAL_PATTERNS for m in p.finditer(text)]


def world_open_ports(config: dict) -> list:
    """(from, to) of every explicit inbound rule that admits the whole internet to anything but SSH."""
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    bad = []
    for rule in rules:
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])} | {r.get("CidrIpv6") for r in
                                                                         rule.get("Ipv6Ranges", [])}
        if cidrs & WORLD and not (rule.get("IpProtocol") == "tcp" and rule.get("FromPort") == rule.get("ToPort") == 22):
            bad.append((rule.get("FromPort"), rule.get("ToPort")))
    return bad


# --- cluster.yaml against Ray's schema ---------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validation():
    config = load_cluster()
    ray_validate(config)
    assert config["provider"]["type"] == "aws"


@pytest.mark.parametrize("breakage", ["unknown top-level key", "unknown docker key", "node type without resources",
                                      "min_workers above max_workers"])
def test_a_broken_cluster_yaml_fails_the_same_validation(breakage):
    config = load_cluster()
    if breakage == "unknown top-level key":
        config["gpu_workers"] = 4
    elif breakage == "unknown docker key":
        config["docker"]["gpus"] = "all"
    elif breakage == "node type without resources":
        del config["available_node_types"]["gpu_worker"]["resources"]
    else:
        config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_cluster_yaml_shape():
    config = load_cluster()
    types = config["available_node_types"]
    head, workers = types[config["head_node_type"]], [t for n, t in types.items() if n != config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert workers and all(w["resources"].get("GPU") == 1 and w.get("min_workers", 0) == 0 for w in workers)
    docker = config["docker"]
    assert docker["container_name"] and "--gpus all" in docker["worker_run_options"]
    assert f"--volume {SHARED}:{SHARED}" in docker["run_options"]
    # EFS is mounted on the host of every node before the container starts (initialization_commands run there).
    assert any("mount -t nfs4" in c and c.rstrip().endswith(f":/ {SHARED}") for c in config["initialization_commands"])
    # The head runs MLflow on shared storage, reachable from the workers; Ray starts with its URI in the env.
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert re.search(rf"mlflow server --backend-store-uri sqlite:///{SHARED}/mlflow/mlflow\.db", head_cmds)
    assert "--host 0.0.0.0 --port 5000" in head_cmds and 'echo "http://$HEAD_IP:5000" >' in head_cmds
    assert "MLFLOW_TRACKING_URI=$(cat /home/ray/shared/mlflow/tracking_uri)" in head_cmds
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(config["worker_start_ray_commands"])
    assert f"--storage {SHARED}/runs" in CLUSTER.read_text()


def test_every_cluster_yaml_command_is_valid_shell():
    config = load_cluster()
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    for cmd in [c for k in keys for c in config[k]]:
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


def test_every_cluster_yaml_key_has_a_comment():
    """Each `key:` line carries a comment, or the line above it is one."""
    key = re.compile(r"^\s*(?:-\s+)?[A-Za-z_][\w.-]*:(\s|$)")
    missing, previous = [], ""
    for number, line in enumerate(CLUSTER.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if key.match(line) and "#" not in line and not previous.lstrip().startswith("#"):
            missing.append(f"{number}: {line}")
        previous = line
    assert not missing, "uncommented keys in cluster.yaml:\n" + "\n".join(missing)


# --- security ----------------------------------------------------------------------------------------------------


def test_only_mlflow_listens_beyond_the_head_itself():
    """The dashboard / job API binds 127.0.0.1 (reached by SSH); only MLflow, which the workers use, binds more."""
    commands = load_cluster()["head_start_ray_commands"]
    assert "--dashboard-host=127.0.0.1" in " ".join(commands)
    assert [c for c in commands if "0.0.0.0" in c] == [c for c in commands if "mlflow server" in c]


def test_only_ssh_is_open_to_the_world():
    config = load_cluster()
    assert world_open_ports(config) == []
    # The nodes use the group Ray creates (intra-group traffic + SSH 22): a config-supplied group or network
    # interface would replace it with rules this test cannot see.
    for node_type in config["available_node_types"].values():
        assert not {"SecurityGroupIds", "NetworkInterfaces"} & set(node_type["node_config"])


def test_the_world_open_check_can_fail():
    config = load_cluster()
    config["provider"]["security_group"]["IpPermissions"] = [
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 8265, "ToPort": 8265, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        {"IpProtocol": "tcp", "FromPort": 5000, "ToPort": 5000, "IpRanges": [{"CidrIp": "10.0.0.0/16"}]},
    ]
    assert world_open_ports(config) == [(5000, 5000), (8265, 8265)]


@pytest.mark.parametrize("path", [CLUSTER, RAYJOB, DOCKERFILE], ids=lambda p: p.name)
def test_no_literal_credentials(path):
    assert credentials_in(path.read_text()) == []


def test_the_credential_check_can_fail():
    key_id = "AKIA" + "Q" * 12 + "7XYZ"
    secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert credentials_in(f"aws_access_key_id: {key_id}")
    assert credentials_in(f"  secret: {secret}\n")
    assert credentials_in("AWS_SECRET_ACCESS_KEY=abc")
    assert credentials_in("-----BEGIN RSA PRIVATE KEY-----")


def test_nothing_in_the_kubernetes_manifest_is_public():
    for doc in rayjob_docs():
        assert doc["kind"] != "Ingress" and doc["kind"] != "Secret"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"
    head = by_kind("RayJob")[0]["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    assert "hostNetwork" not in RAYJOB.read_text() and "hostPort" not in RAYJOB.read_text()


# --- the RayJob manifest (structure: no Kubernetes schema offline) -----------------------------------------------


def test_rayjob_manifest_structure():
    docs = rayjob_docs()
    assert all(d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name") for d in docs)
    jobs = by_kind("RayJob")
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.startswith("python -m fsynth.tune ") and "--dataset " in entry
    assert f"--storage {K8S_SHARED}/runs" in entry and f"--out {K8S_SHARED}/" in entry
    assert "--tracking-uri http://mlflow:5000" in entry
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["ttlSecondsAfterFinished"], int)
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True  # the GPU group starts at zero pods

    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head_pod["containers"][0].get("resources", {}).get("limits", {})
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1

    (claim,) = by_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    pods = [head_pod] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        volume = next(v["name"] for v in pod["volumes"]
                      if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"])
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[volume] == K8S_SHARED
    images = {p["containers"][0]["image"] for p in pods}
    assert len(images) == 1  # head and workers run the same image


def test_rayjob_manifest_mlflow():
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "mlflow"]
    assert any(p["port"] == 5000 for p in service["spec"]["ports"])
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert deployment["spec"]["replicas"] == 1
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pod = deployment["spec"]["template"]["spec"]
    command = " ".join(pod["containers"][0].get("command", []) + pod["containers"][0].get("args", []))
    assert "mlflow server" in command and "--host 0.0.0.0 --port 5000" in command
    assert f"sqlite:///{K8S_SHARED}/" in command
    # MLflow 3 rejects unknown Host headers: the Service name must be allowed.
    assert re.search(r"--allowed-hosts '[^']*\bmlflow:\*", command)
    assert any(v.get("persistentVolumeClaim") for v in pod["volumes"])


# --- the image -----------------------------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_installed_ray_and_setup_torch():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311-gpu$", text, re.M)
    assert re.search(r'pip install [^\n]*-e "\.\[gpu\]"', text)
    # The torch pair of scripts/setup.sh on x86_64 (the GPU nodes) is the image's.
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    (setup_torch,) = re.findall(r'\*\) default_torch="([^"]+)"', setup)
    assert f'ARG FSYNTH_TORCH="{setup_torch}"' in text
    # Every image reference of the deployments is the fsynth image built from it, for the same Ray.
    config = load_cluster()
    assert config["docker"]["image"].split("/")[-1] == f"fsynth:ray{ray.__version__}-py311-gpu"
    pods = [d["spec"]["template"]["spec"] for d in by_kind("Deployment")]
    job = by_kind("RayJob")[0]["spec"]["rayClusterSpec"]
    pods += [job["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in job["workerGroupSpecs"]]
    assert {c["image"].split("/")[-1] for p in pods for c in p["containers"]} == {
        f"fsynth:ray{ray.__version__}-py311-gpu"}
