"""Kubernetes manifests: every rendered kind validates against the real schemas, offline.

Built-in kinds go through kubernetes-validate in strict mode; PyTorchJob and JobSet through
their real CRD OpenAPI schemas (../shared/k8s-crds) with jsonschema, plus a strict check
that no field is unknown to the schema (what the API server's pruning would drop silently).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from launch.k8s import KINDS, K8sJob, render, to_yaml

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "k8s-crds"
GOLDEN = Path(__file__).parent / "golden"
K8S_VERSION = "1.37.0"
CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("jobset.x-k8s.io/v1alpha2", "JobSet"): "jobset.x-k8s.io_jobsets.yaml",
}


def typical_job(**kw) -> K8sJob:
    base = dict(name="depth-r18", image="registry.example.com/geoprime:0.1.0",
                overrides=["task=depth", "parallel=fsdp", "train.steps=20000"], nodes=2, gpus_per_node=8,
                shards_url="s3://geoprime-shards/kitti")
    base.update(kw)
    return K8sJob(**base)


def crd_schema(api_version: str, kind: str) -> dict:
    path = CRD_DIR / CRD_FILES[(api_version, kind)]
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not present")
    crd = yaml.safe_load(path.read_text())
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{path}: no version {version}")


def unknown_fields(doc, schema, path="") -> list[str]:
    """Paths in ``doc`` that the structural schema does not declare (strict-mode check)."""
    found: list[str] = []
    if isinstance(doc, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return found
        for key, value in doc.items():
            if props is not None and key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif props is not None and key != "metadata":
                found.append(f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_doc(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        schema = crd_schema(*key)
        jsonschema.validate(doc, schema)
        assert unknown_fields(doc, schema) == []
        # The embedded pod template must also be a valid built-in Pod spec.
        for template in pod_templates(doc):  # (a Job's template is checked by kubernetes-validate itself)
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": template["spec"]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "PyTorchJob":
        return [r["template"] for r in doc["spec"]["pytorchReplicaSpecs"].values()]
    if doc["kind"] == "JobSet":
        return [r["template"]["spec"]["template"] for r in doc["spec"]["replicatedJobs"]]
    if doc["kind"] == "Job":
        return [doc["spec"]["template"]]
    return []


def containers(doc: dict) -> list[dict]:
    return [c for t in pod_templates(doc) for c in t["spec"]["containers"]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shards", ["url", "pvc"])
def test_every_kind_validates_against_real_schemas(kind, shards):
    job = typical_job() if shards == "url" else typical_job(shards_url=None, shards_pvc="kitti-shards")
    docs = render(kind, job)
    assert docs
    for doc in docs:
        validate_doc(doc)


def test_the_strict_check_catches_a_wrong_field():
    doc = render("pytorchjob", typical_job())[0]
    doc["spec"]["elasticPolicy"]["maxRestart"] = 3  # typo of maxRestarts
    assert unknown_fields(doc, crd_schema("kubeflow.org/v1", "PyTorchJob")) == [".spec.elasticPolicy.maxRestart"]
    bad_job = render("job", typical_job())[1]
    bad_job["spec"]["completionsMode"] = "Indexed"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_job, K8S_VERSION, strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_security_resources_and_secrets(kind):
    docs = render(kind, typical_job())
    text = to_yaml(docs)
    for doc in docs:
        for c in containers(doc):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["privileged"] is False
            assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
            assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/dev/shm", "/checkpoints"} <= mounts
            uri = next(e for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI")
            assert uri["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": "uri"}
            assert "data.root=s3://geoprime-shards/kitti" in c["command"]
            assert "out_dir=/checkpoints/depth-r18" in c["command"]
        for t in pod_templates(doc):
            assert t["spec"]["securityContext"]["runAsNonRoot"] is True
    # credentials are referenced, never written
    assert "password:" not in text.replace("key: password", "")
    assert "ttlSecondsAfterFinished: 86400" in text


def test_rendezvous_and_topology():
    svc, job = render("job", typical_job())
    assert svc["spec"]["clusterIP"] == "None"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert job["spec"]["template"]["spec"]["subdomain"] == svc["metadata"]["name"]
    assert "--rdzv_endpoint=depth-r18-0.depth-r18:29400" in cmd and "--nnodes=2" in cmd and "--nproc_per_node=8" in cmd
    (js,) = render("jobset", typical_job())
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 3
    jcmd = pod_templates(js)[0]["spec"]["containers"][0]["command"]
    assert "--rdzv_endpoint=depth-r18-node-0-0.depth-r18:29400" in jcmd
    (pj,) = render("pytorchjob", typical_job())
    assert pj["spec"]["nprocPerNode"] == "8"
    assert pj["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert pj["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_pod_grace_covers_the_ranks_grace(kind):
    """Kubernetes SIGKILLs a pod terminationGracePeriodSeconds after its SIGTERM: that must be longer
    than the time torchrun gives the ranks to checkpoint (--shutdown-timeout), which they are told."""
    from launch.torchrun import STOP_MARGIN_S

    pods = [pod for doc in render(kind, typical_job(grace_s=600)) for pod in pod_templates(doc)]
    assert pods
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert pod["spec"]["terminationGracePeriodSeconds"] == 600 + STOP_MARGIN_S
        assert "--shutdown-timeout=600" in container["command"]
        assert {"name": "GEOPRIME_STOP_GRACE_S", "value": "600"} in container["env"]


@pytest.mark.parametrize("kind", KINDS)
def test_golden_file(kind):
    """The rendered YAML of a typical case is kept; a change to it must be deliberate."""
    text = to_yaml(render(kind, typical_job()))
    golden = GOLDEN / f"k8s_{kind}.yaml"
    assert golden.is_file(), f"missing golden file {golden}; write it with tests/golden/regenerate.py"
    assert text == golden.read_text()


@pytest.mark.parametrize("bad,match", [
    (dict(name="Bad_Name"), "DNS-1123"),
    (dict(shards_url=None), "exactly one of"),
    (dict(shards_pvc="x"), "exactly one of"),
    (dict(shards_url="ftp://x"), "s3://"),
    (dict(overrides=["out_dir=/tmp"]), "out_dir"),
])
def test_bad_options_name_the_option(bad, match):
    with pytest.raises(ValueError, match=match):
        typical_job(**bad)


def test_cli_writes_yaml_that_round_trips(tmp_path):
    out = tmp_path / "job.yaml"
    r = subprocess.run([sys.executable, "-m", "launch", "k8s", "task=depth", "--image", "img:1", "--kind", "jobset",
                        "--shards-pvc", "shards", "--nodes", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all(out.read_text()))
    assert docs[0]["kind"] == "JobSet"
    validate_doc(docs[0])
    r = subprocess.run([sys.executable, "-m", "launch", "k8s", "--image", "img:1", "--kind", "job"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "--shards-url" in r.stderr


def test_default_job_name_is_one_per_job(tmp_path):
    """Two jobs rendered with the defaults get their own name, rendezvous id and out_dir; the same
    job rendered again keeps its name (kubectl apply updates it instead of starting a second)."""
    from launch.k8s import main

    def rendered(*overrides: str) -> dict:
        out = tmp_path / "m.yaml"
        assert main([*overrides, "--image", "img:1", "--shards-url", "s3://b/kitti", "--out", str(out)]) == 0
        return list(yaml.safe_load_all(out.read_text()))[1]

    a, b, again = rendered("task=depth", "seed=0"), rendered("task=depth", "seed=1"), rendered("seed=0", "task=depth")
    name = a["metadata"]["name"]
    assert name.startswith("geoprime-depth-") and name != b["metadata"]["name"] and name == again["metadata"]["name"]
    command = a["spec"]["template"]["spec"]["containers"][0]["command"]
    assert f"--rdzv_id={name}" in command and f"out_dir=/checkpoints/{name}" in command
