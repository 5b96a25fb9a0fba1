"""Where a training step runs on Kubernetes: the pod a heavy step gets (GPU limit, node selector,
tolerations, secrets as environment), built in code from environment variables so one image
serves every cluster.

Dagster's Kubernetes executor (`k8s_job_executor`, set up by the Helm values) starts one pod per
step and reads each step's ``dagster-k8s/config`` tag: the heavy assets (the ``train`` pool) carry
the tag ``training_k8s_config()`` returns. Outside Kubernetes the tag is inert.

Settings, all optional (defaults suit an NVIDIA GPU node pool):
  LIFECYCLE_TRAIN_GPUS           GPUs per training pod (default 1; 0 = CPU pod)
  LIFECYCLE_TRAIN_CPU            CPU request (default "4")
  LIFECYCLE_TRAIN_MEMORY         memory request and limit (default "32Gi")
  LIFECYCLE_TRAIN_NODE_SELECTOR  JSON object (default {"nvidia.com/gpu.present": "true"})
  LIFECYCLE_TRAIN_TOLERATIONS    JSON list (default: tolerate the nvidia.com/gpu taint)
  LIFECYCLE_SECRET               Secret whose keys become environment variables (credentials)
  LIFECYCLE_CONFIG_MAP           ConfigMap with the rest of the environment
  LIFECYCLE_CHECKPOINTS_CLAIM    PersistentVolumeClaim (ReadWriteMany) for trainer checkpoints,
                                 so the retry of a run whose pod died resumes training; unset:
                                 node-local scratch, which dies with the pod
  LIFECYCLE_HOME_CLAIM           PersistentVolumeClaim (ReadWriteMany) holding LIFECYCLE_HOME (the
                                 artifact cache and staging, checkpoints) at /lifecycle; needed
                                 with LIFECYCLE_TRAINING=k8s, where a step's pod reads and writes
                                 the folders its run resolved
  LIFECYCLE_LAUNCHER_MEMORY      with LIFECYCLE_TRAINING=k8s: memory of the run's step pod that
                                 launches the training pod (default "4Gi")

With LIFECYCLE_TRAINING=k8s the heavy steps run in pods of their own through Dagster Pipes
(``step_pod``: the GPU request, placement and secrets); the run's step pod then carries no GPU.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping

K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_SECRET = "lifecycle-secrets"
DEFAULT_CONFIG_MAP = "lifecycle-config"
CHECKPOINTS_MOUNT = "/checkpoints"
HOME_MOUNT = "/lifecycle"
PART_OF = {"app.kubernetes.io/part-of": "lifecycle-dagster"}


def _json(env: Mapping[str, str], key: str, default):
    raw = env.get(key)
    if not raw:
        return copy.deepcopy(default)  # a caller editing its pod never edits the defaults
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{key}: not valid JSON ({exc.msg} at column {exc.colno})") from exc


def training_resources(env: Mapping[str, str] | None = None) -> dict:
    """The training container's requests and limits (Kubernetes field names)."""
    env = os.environ if env is None else env
    gpus = int(env.get("LIFECYCLE_TRAIN_GPUS", "1"))
    if gpus < 0:
        raise ValueError(f"LIFECYCLE_TRAIN_GPUS: {gpus} is negative")
    memory = env.get("LIFECYCLE_TRAIN_MEMORY", "32Gi")
    requests = {"cpu": env.get("LIFECYCLE_TRAIN_CPU", "4"), "memory": memory}
    limits: dict = {"memory": memory}
    if gpus:
        # Extended resources are requested through limits (requests default to them).
        limits[GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}


def training_pod_spec(image: str, env: Mapping[str, str] | None = None) -> dict:
    """The PodSpec of one training step (as a manifest would spell it)."""
    env = os.environ if env is None else env
    resources = training_resources(env)
    spec = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "train",
                "image": image,
                "resources": resources,
                "envFrom": [
                    {"secretRef": {"name": env.get("LIFECYCLE_SECRET", DEFAULT_SECRET)}},
                    {"configMapRef": {"name": env.get("LIFECYCLE_CONFIG_MAP", DEFAULT_CONFIG_MAP)}},
                ],
                # The staging area of the step's artifact: node-local scratch.
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    container = spec["containers"][0]
    if claim := env.get("LIFECYCLE_HOME_CLAIM"):
        # The run and its step pods see the same folders at the same paths.
        container.setdefault("env", []).append({"name": "LIFECYCLE_HOME", "value": HOME_MOUNT})
        container["volumeMounts"].append({"name": "lifecycle-home", "mountPath": HOME_MOUNT})
        spec["volumes"].append(
            {"name": "lifecycle-home", "persistentVolumeClaim": {"claimName": claim}}
        )
    if claim := env.get("LIFECYCLE_CHECKPOINTS_CLAIM"):
        # Checkpoints outlive the pod: a retry's pod, wherever it lands, resumes from them.
        container.setdefault("env", []).append(
            {"name": "LIFECYCLE_CHECKPOINTS", "value": CHECKPOINTS_MOUNT}
        )
        container["volumeMounts"].append({"name": "checkpoints", "mountPath": CHECKPOINTS_MOUNT})
        spec["volumes"].append(
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}}
        )
    if GPU_RESOURCE in resources["limits"]:  # a GPU pod goes to the GPU nodes
        spec["nodeSelector"] = _json(env, "LIFECYCLE_TRAIN_NODE_SELECTOR", DEFAULT_NODE_SELECTOR)
        spec["tolerations"] = _json(env, "LIFECYCLE_TRAIN_TOLERATIONS", DEFAULT_TOLERATIONS)
    return spec


def training_pod(name: str, image: str, env: Mapping[str, str] | None = None) -> dict:
    """A whole Pod manifest for one training step (what `kubectl apply` and the schema checks
    take)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": dict(PART_OF)},
        "spec": training_pod_spec(image, env),
    }


def step_pod(image: str, env: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """The metadata and PodSpec a heavy step's pod starts from under Dagster Pipes
    (``PipesK8sClient`` adds the name, the command and the Pipes environment)."""
    return {"labels": {**PART_OF, "app.kubernetes.io/component": "training-step"}}, (
        training_pod_spec(image, env)
    )


def training_k8s_config(env: Mapping[str, str] | None = None) -> dict:
    """The ``dagster-k8s/config`` tag of a heavy step: the same requests, limits, placement and
    environment as ``training_pod_spec``, in the form Dagster's Kubernetes executor reads (its
    container image comes from the code location). With LIFECYCLE_TRAINING=k8s the training
    happens in the step's own pod (``step_pod``), so this pod asks for no GPU."""
    env = os.environ if env is None else env
    if env.get("LIFECYCLE_TRAINING") == "k8s":
        env = {**env, "LIFECYCLE_TRAIN_GPUS": "0", "LIFECYCLE_TRAIN_CPU": "1"}
        env["LIFECYCLE_TRAIN_MEMORY"] = env.get("LIFECYCLE_LAUNCHER_MEMORY", "4Gi")
    spec = training_pod_spec("<code location image>", env)
    container = spec["containers"][0]
    secret, config_map = container["envFrom"]
    config: dict = {
        "container_config": {
            "resources": container["resources"],
            "env_from": [
                {"secret_ref": secret["secretRef"]},
                {"config_map_ref": config_map["configMapRef"]},
            ],
            "volume_mounts": [
                {"name": m["name"], "mount_path": m["mountPath"]} for m in container["volumeMounts"]
            ],
        },
        "pod_spec_config": {"volumes": [_snake_volume(v) for v in spec["volumes"]]},
    }
    if "env" in container:
        config["container_config"]["env"] = container["env"]
    if "nodeSelector" in spec:
        config["pod_spec_config"]["node_selector"] = spec["nodeSelector"]
        config["pod_spec_config"]["tolerations"] = spec["tolerations"]
    return config


def training_op_tags() -> dict:
    """Op tags of a heavy asset: its pod's config, serialised as Dagster's tags require."""
    return {K8S_CONFIG_TAG: json.dumps(training_k8s_config())}


def _snake_volume(volume: dict) -> dict:
    """A volume as dagster-k8s's config spells it (the Kubernetes client's field names)."""
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]["claimName"]
        return {"name": volume["name"], "persistent_volume_claim": {"claim_name": claim}}
    return {"name": volume["name"], "empty_dir": {}}
