"""`python -m launch k8s`: render Kubernetes manifests for one training job.

Three kinds: ``job`` (plain Kubernetes: an Indexed Job + a headless Service for the
rendezvous, pod index = node rank), ``jobset`` (JobSet v1alpha2, restarts the whole set on
failure so training resumes from its last checkpoint) and ``pytorchjob`` (Kubeflow
PyTorchJob v1 with an elastic policy). Secrets are only ever referenced, never written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from data_shards.atomic import atomic_write_text
from launch.torchrun import DEFAULT_GRACE_S, DEFAULT_RDZV_PORT, STOP_MARGIN_S, TORCHRUN_ENV, TorchrunJob
from trainer.checkpointing.stop_record import GRACE_ENV

KINDS = ("job", "jobset", "pytorchjob")
CONTAINER_NAME = "pytorch"  # the training operator requires this name for PyTorchJob
SHARDS_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class K8sJob:
    """Everything a manifest needs; validated on construction so errors name the option."""

    name: str
    image: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 1
    namespace: str = "default"
    shards_url: str | None = None
    shards_pvc: str | None = None
    checkpoint_pvc: str = "geoprime-checkpoints"
    mlflow_secret: str = "mlflow-credentials"
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"
    max_restarts: int = 3
    backoff_limit: int = 3
    ttl_seconds: int = 86400
    run_as_user: int = 1000
    labels: dict[str, str] = field(default_factory=dict)
    grace_s: int = DEFAULT_GRACE_S
    """Seconds the ranks get to checkpoint after a stop (torchrun's --shutdown-timeout); the pod's
    terminationGracePeriodSeconds is this plus STOP_MARGIN_S, so Kubernetes never cuts it short."""

    def __post_init__(self) -> None:
        if not _DNS1123.match(self.name) or len(self.name) > 40:
            raise ValueError(f"--name={self.name!r}: must be a DNS-1123 label (lowercase letters, digits, '-') of at most 40 characters")
        if not self.image:
            raise ValueError("--image is required (the geoprime image built from the Dockerfile)")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"--nodes={self.nodes} / --gpus-per-node={self.gpus_per_node}: nodes >= 1, gpus >= 0")
        if self.grace_s < 0:
            raise ValueError(f"--grace={self.grace_s}: must be >= 0 seconds")
        if bool(self.shards_url) == bool(self.shards_pvc):
            raise ValueError("give exactly one of --shards-url (object storage / http URL) or --shards-pvc (a PersistentVolumeClaim)")
        if self.shards_url and not re.match(r"^(s3|https?)://", self.shards_url):
            raise ValueError(f"--shards-url={self.shards_url!r}: expected s3://, http:// or https://")
        for o in self.overrides:
            if o.split("=", 1)[0].lstrip("+~") in ("data.root", "out_dir"):
                raise ValueError(f"override {o!r}: data.root and out_dir are set from --shards-* and --checkpoint-pvc")

    @property
    def procs_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    def trainer_overrides(self) -> list[str]:
        root = self.shards_url or SHARDS_MOUNT
        return [*self.overrides, f"data.root={root}", f"out_dir={CHECKPOINT_MOUNT}/{self.name}"]

    # --- pod pieces -------------------------------------------------------------------
    def _labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": "geoprime", "app.kubernetes.io/instance": self.name, **self.labels}

    def _env(self) -> list[dict[str, Any]]:
        secret = self.mlflow_secret
        env: list[dict[str, Any]] = [
            {"name": "MLFLOW_TRACKING_URI", "valueFrom": {"secretKeyRef": {"name": secret, "key": "uri"}}},
            {"name": "MLFLOW_TRACKING_USERNAME", "valueFrom": {"secretKeyRef": {"name": secret, "key": "username", "optional": True}}},
            {"name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password", "optional": True}}},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            *({"name": k, "value": v} for k, v in {**TORCHRUN_ENV, GRACE_ENV: str(self.grace_s)}.items()),
        ]
        if self.shards_url and self.shards_url.startswith("s3://"):
            env += [
                {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": secret, "key": "aws_access_key_id", "optional": True}}},
                {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": secret, "key": "aws_secret_access_key", "optional": True}}},
                {"name": "AWS_ENDPOINT_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": "aws_endpoint_url", "optional": True}}},
            ]
        return env

    def _resources(self) -> dict[str, Any]:
        req = {"cpu": self.cpu, "memory": self.memory}
        lim = {"memory": self.memory}
        if self.gpus_per_node:
            req["nvidia.com/gpu"] = str(self.gpus_per_node)
            lim["nvidia.com/gpu"] = str(self.gpus_per_node)
        return {"requests": req, "limits": lim}

    def _volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        volumes: list[dict[str, Any]] = [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": self.checkpoint_pvc}},
        ]
        mounts: list[dict[str, Any]] = [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
        ]
        if self.shards_pvc:
            volumes.append({"name": "shards", "persistentVolumeClaim": {"claimName": self.shards_pvc, "readOnly": True}})
            mounts.append({"name": "shards", "mountPath": SHARDS_MOUNT, "readOnly": True})
        return volumes, mounts

    def container(self, command: list[str]) -> dict[str, Any]:
        _, mounts = self._volumes()
        return {
            "name": CONTAINER_NAME,
            "image": self.image,
            "imagePullPolicy": "IfNotPresent",
            "command": command,
            "env": self._env(),
            "resources": self._resources(),
            "volumeMounts": mounts,
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "privileged": False,
                "readOnlyRootFilesystem": False,
                "capabilities": {"drop": ["ALL"]},
            },
        }

    def pod_spec(self, command: list[str], *, restart_policy: str, subdomain: str | None = None) -> dict[str, Any]:
        volumes, _ = self._volumes()
        spec: dict[str, Any] = {
            "restartPolicy": restart_policy,
            "terminationGracePeriodSeconds": self.grace_s + STOP_MARGIN_S,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": self.run_as_user,
                "runAsGroup": self.run_as_user,
                "fsGroup": self.run_as_user,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "automountServiceAccountToken": False,
            "containers": [self.container(command)],
            "volumes": volumes,
        }
        if subdomain:
            spec["subdomain"] = subdomain
        return spec

    def torchrun_command(self, rdzv_host: str, nnodes: str | None = None) -> list[str]:
        """torchrun inside the pod; node rank comes from the rendezvous, restarts resume from checkpoints."""
        job = TorchrunJob(overrides=self.trainer_overrides(), nodes=self.nodes, procs_per_node=self.procs_per_node,
                          rdzv=f"{rdzv_host}:{DEFAULT_RDZV_PORT}", run_id=self.name, max_restarts=self.max_restarts,
                          grace_s=self.grace_s)
        return ["torchrun", *job.torchrun_args(nnodes=nnodes)]


def _meta(job: K8sJob, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": job._labels()}


def render_job(job: K8sJob) -> list[dict[str, Any]]:
    """Plain Kubernetes: headless Service + Indexed Job (completions = parallelism = nodes)."""
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, job.name),
        "spec": {
            "clusterIP": "None",
            "selector": {"batch.kubernetes.io/job-name": job.name},
            "ports": [{"name": "rdzv", "port": DEFAULT_RDZV_PORT, "targetPort": DEFAULT_RDZV_PORT}],
            "publishNotReadyAddresses": True,
        },
    }
    # Pod 0 of an Indexed Job is reachable as <job>-0.<service> through the headless Service.
    rdzv_host = f"{job.name}-0.{job.name}"
    batch_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(job, job.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": job.nodes,
            "parallelism": job.nodes,
            "backoffLimit": job.backoff_limit,
            "ttlSecondsAfterFinished": job.ttl_seconds,
            "template": {
                "metadata": {"labels": job._labels()},
                "spec": job.pod_spec(job.torchrun_command(rdzv_host), restart_policy="OnFailure", subdomain=job.name),
            },
        },
    }
    return [svc, batch_job]


def render_jobset(job: K8sJob) -> list[dict[str, Any]]:
    """JobSet: one replicated Indexed Job of `nodes` pods; failurePolicy restarts the set."""
    rjob = "node"
    # JobSet gives pods DNS names <jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>.
    rdzv_host = f"{job.name}-{rjob}-0-0.{job.name}"
    return [{
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": _meta(job, job.name),
        "spec": {
            "network": {"enableDNSHostnames": True, "subdomain": job.name},
            "failurePolicy": {"maxRestarts": job.max_restarts},
            "ttlSecondsAfterFinished": job.ttl_seconds,
            "replicatedJobs": [{
                "name": rjob,
                "replicas": 1,
                "template": {
                    "spec": {
                        "completionMode": "Indexed",
                        "completions": job.nodes,
                        "parallelism": job.nodes,
                        "backoffLimit": 0,
                        "template": {
                            "metadata": {"labels": job._labels()},
                            "spec": job.pod_spec(job.torchrun_command(rdzv_host), restart_policy="Never"),
                        },
                    },
                },
            }],
        },
    }]


def render_pytorchjob(job: K8sJob) -> list[dict[str, Any]]:
    """Kubeflow PyTorchJob with an elastic policy; the operator sets torchrun's PET_* variables."""
    # With elasticPolicy the operator passes --nnodes/--rdzv_* to torchrun through PET_* env.
    command = ["torchrun", f"--nproc_per_node={job.procs_per_node}", f"--max_restarts={job.max_restarts}",
               f"--shutdown-timeout={job.grace_s}", "-m", "trainer", *job.trainer_overrides()]
    return [{
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _meta(job, job.name),
        "spec": {
            "nprocPerNode": str(job.procs_per_node),
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "minReplicas": job.nodes,
                "maxReplicas": job.nodes,
                "maxRestarts": job.max_restarts,
            },
            "runPolicy": {
                "backoffLimit": job.backoff_limit,
                "ttlSecondsAfterFinished": job.ttl_seconds,
                "cleanPodPolicy": "None",
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": job.nodes,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "metadata": {"labels": job._labels()},
                        "spec": job.pod_spec(command, restart_policy="OnFailure"),
                    },
                },
            },
        },
    }]


RENDERERS = {"job": render_job, "jobset": render_jobset, "pytorchjob": render_pytorchjob}


def render(kind: str, job: K8sJob) -> list[dict[str, Any]]:
    """Manifests (as dicts) for ``job`` in the given kind."""
    if kind not in RENDERERS:
        raise ValueError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")
    return RENDERERS[kind](job)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """A multi-document YAML string, keys in insertion order."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by `launch k8s` and the study's `--emit k8s`."""
    p.add_argument("--nodes", type=int, default=1, help="nodes (pods)")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (and training processes) per pod")
    p.add_argument("--image", required=True, help="container image built from the Dockerfile")
    p.add_argument("--kind", choices=KINDS, default="job", help="manifest kind")
    p.add_argument("--namespace", default="default")
    p.add_argument("--shards-url", default=None, help="shards in object storage / over http (s3://bucket/prefix)")
    p.add_argument("--shards-pvc", default=None, help="PersistentVolumeClaim holding the shards (mounted read-only at /data)")
    p.add_argument("--checkpoint-pvc", default="geoprime-checkpoints", help="PersistentVolumeClaim for checkpoints and outputs")
    p.add_argument("--mlflow-secret", default="mlflow-credentials",
                   help="Secret with key 'uri' (and optional username/password, aws_* keys); referenced, never copied")
    p.add_argument("--cpu", default="8")
    p.add_argument("--memory", default="64Gi")
    p.add_argument("--shm-size", default="16Gi", help="shared-memory volume for DataLoader workers")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--backoff-limit", type=int, default=3)
    p.add_argument("--ttl-seconds", type=int, default=86400, help="delete the finished job after this long")
    p.add_argument("--grace", type=int, default=DEFAULT_GRACE_S,
                   help="seconds the ranks get to checkpoint after SIGTERM (torchrun --shutdown-timeout); "
                        f"terminationGracePeriodSeconds is {STOP_MARGIN_S} s more")


def job_from_args(args: argparse.Namespace, name: str, overrides: list[str], labels: dict[str, str] | None = None) -> K8sJob:
    return K8sJob(name=name, image=args.image, overrides=overrides, nodes=args.nodes,
                  gpus_per_node=args.gpus_per_node, namespace=args.namespace, shards_url=args.shards_url,
                  shards_pvc=args.shards_pvc, checkpoint_pvc=args.checkpoint_pvc, mlflow_secret=args.mlflow_secret,
                  cpu=args.cpu, memory=args.memory, shm_size=args.shm_size, max_restarts=args.max_restarts,
                  backoff_limit=args.backoff_limit, ttl_seconds=args.ttl_seconds, labels=labels or {},
                  grace_s=args.grace)


def default_name(args: argparse.Namespace) -> str:
    """``geoprime-<task>-<8 hex digits of the job>``: rendering the same job again gives the same
    name (``kubectl apply`` updates it), another job gets its own name, rendezvous id and
    ``out_dir`` instead of colliding with the first."""
    task = next((o.split("=", 1)[1] for o in args.overrides if o.lstrip("+").split("=", 1)[0] == "task"), "")
    key = json.dumps([args.kind, args.nodes, args.gpus_per_node, args.image, args.shards_url, args.shards_pvc,
                      sorted(args.overrides)])
    slug = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:20]
    return "-".join(p for p in ("geoprime", slug, hashlib.sha256(key.encode()).hexdigest()[:8]) if p)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m launch k8s", description="Render Kubernetes manifests for a training "
                                "job. Before the first job: kubectl apply -f docker/k8s/checkpoints-pvc.yaml and "
                                "create the MLflow Secret (README, Kubernetes).")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the trainer, e.g. task=depth parallel=fsdp")
    p.add_argument("--name", default=None, help="job name (DNS-1123 label; default geoprime-<task>-<hash of the "
                                                "job>, also its rendezvous id and out_dir=/checkpoints/<name>)")
    p.add_argument("--out", default=None, help="write the YAML here (default: stdout)")
    add_job_arguments(p)
    args = p.parse_intermixed_args(argv)
    try:
        docs = render(args.kind, job_from_args(args, args.name or default_name(args), args.overrides))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = to_yaml(docs)
    if args.out:
        out = atomic_write_text(args.out, text)
        print(f"[launch] wrote {len(docs)} manifest(s) to {out}: kubectl apply -f {shlex.quote(str(out))}")
    else:
        sys.stdout.write(text)
    return 0
