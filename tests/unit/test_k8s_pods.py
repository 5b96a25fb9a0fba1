"""The training pod a heavy step gets on Kubernetes: built in code from environment variables,
valid against Kubernetes' own schemas (offline, kubernetes-validate), and turned by dagster-k8s
into the step's Job with the GPU limit, placement and secrets intact."""

import json

import kubernetes_validate
import pytest

from lifecycle_dagster.lib import k8s

K8S_VERSION = "1.33.0"  # a Kubernetes version current clusters run
IMAGE = "registry.example.com/lifecycle-dagster:0.1.0"


def test_gpu_training_pod_is_a_valid_pod_with_limit_placement_and_secrets():
    pod = k8s.training_pod("sft-adapter", IMAGE, env={})
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert {"secretRef": {"name": "lifecycle-secrets"}} in container["envFrom"]
    # No secret value is ever in the spec: only the Secret's name.
    assert "password" not in json.dumps(pod).lower()


def test_cluster_settings_come_from_the_environment():
    env = {
        "LIFECYCLE_TRAIN_GPUS": "4",
        "LIFECYCLE_TRAIN_MEMORY": "120Gi",
        "LIFECYCLE_TRAIN_NODE_SELECTOR": '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}',
        "LIFECYCLE_TRAIN_TOLERATIONS": '[{"key": "gpu", "operator": "Equal", "value": "h100",'
        ' "effect": "NoSchedule"}]',
        "LIFECYCLE_SECRET": "team-a-credentials",
    }
    pod = k8s.training_pod("aligned-model", IMAGE, env=env)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    spec = pod["spec"]
    limits = spec["containers"][0]["resources"]["limits"]
    assert limits == {"memory": "120Gi", "nvidia.com/gpu": "4"}
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert spec["tolerations"][0]["value"] == "h100"
    assert spec["containers"][0]["envFrom"][0] == {"secretRef": {"name": "team-a-credentials"}}


def test_a_cpu_pod_asks_for_no_gpu_and_no_gpu_node():
    pod = k8s.training_pod("reward-model", IMAGE, env={"LIFECYCLE_TRAIN_GPUS": "0"})
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert "nvidia.com/gpu" not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod["spec"] and "tolerations" not in pod["spec"]


def test_bad_settings_name_the_variable():
    with pytest.raises(ValueError, match="LIFECYCLE_TRAIN_NODE_SELECTOR: not valid JSON"):
        k8s.training_pod("x", IMAGE, env={"LIFECYCLE_TRAIN_NODE_SELECTOR": "{gpu: yes}"})
    with pytest.raises(ValueError, match="LIFECYCLE_TRAIN_GPUS: -1 is negative"):
        k8s.training_pod("x", IMAGE, env={"LIFECYCLE_TRAIN_GPUS": "-1"})


def test_a_schema_check_that_can_fail_does():
    pod = k8s.training_pod("x", IMAGE, env={})
    pod["spec"]["tolerations"][0]["operator"] = 7  # not a string
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def step_job_pod(env: dict) -> dict:
    """The pod spec of the Job dagster-k8s builds for a heavy step from its tag (with ``env`` as
    the code server's environment), checked against Kubernetes' schema."""
    from dagster_k8s.job import (
        DagsterK8sJobConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )
    from kubernetes.client import ApiClient

    tags = {k8s.K8S_CONFIG_TAG: json.dumps(k8s.training_k8s_config(env=env))}
    job = construct_dagster_k8s_job(
        DagsterK8sJobConfig(job_image=IMAGE, dagster_home="/opt/dagster/dagster_home"),
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-sft-adapter",
        user_defined_k8s_config=get_user_defined_k8s_config(tags),
    )
    manifest = ApiClient().sanitize_for_serialization(job)
    kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    return manifest["spec"]["template"]["spec"]


def test_dagster_k8s_turns_the_step_tag_into_a_job_with_the_gpu():
    """The heavy assets' `dagster-k8s/config` tag, read by dagster-k8s as its executor would,
    builds a Job that Kubernetes' schema accepts, with the pod spec above."""
    pod = step_job_pod(env={})
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"secretRef": {"name": "lifecycle-secrets"}} in pod["containers"][0]["envFrom"]


def test_every_training_asset_carries_the_pod_tag():
    import dagster as dg

    from lifecycle_dagster.definitions import defs

    graph = defs().resolve_asset_graph()
    heavy = [k for k in graph.materializable_asset_keys if graph.get(k).pools == {"train"}]
    assert heavy
    for key in heavy:
        node = graph.assets_def_for_key(key)
        tags = node.node_def.tags if isinstance(node, dg.AssetsDefinition) else {}
        config = json.loads(tags[k8s.K8S_CONFIG_TAG])
        limits = config["container_config"]["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == "1", key


def test_checkpoints_on_a_claim_outlive_the_pod():
    """With a claim, trainer checkpoints go to a volume a retry's pod mounts again; the step's
    Job built by dagster-k8s carries the same mount and variable."""
    env = {"LIFECYCLE_CHECKPOINTS_CLAIM": "lifecycle-checkpoints"}
    variable = {"name": "LIFECYCLE_CHECKPOINTS", "value": "/checkpoints"}
    mount = {"name": "checkpoints", "mountPath": "/checkpoints"}
    claim = {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "lifecycle-checkpoints"}}
    pod = k8s.training_pod("sft-adapter", IMAGE, env=env)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (container,) = pod["spec"]["containers"]
    assert variable in container["env"] and mount in container["volumeMounts"]
    assert claim in pod["spec"]["volumes"]
    assert "checkpoints" not in json.dumps(k8s.training_pod("x", IMAGE, env={}))

    spec = step_job_pod(env)
    assert variable in spec["containers"][0]["env"]
    assert mount in spec["containers"][0]["volumeMounts"]
    assert claim in spec["volumes"]


def test_a_pipes_step_pod_has_the_gpu_the_shared_home_and_the_pipes_context():
    """With LIFECYCLE_TRAINING=k8s a heavy step runs in a pod PipesK8sClient builds from
    ``step_pod``: valid against Kubernetes' schema, with the GPU, the home its run shares and
    the Pipes bootstrap variables."""
    from dagster_k8s.pipes import build_pod_body
    from kubernetes.client import ApiClient

    meta, spec = k8s.step_pod(IMAGE, env={"LIFECYCLE_HOME_CLAIM": "lifecycle-home"})
    body = build_pod_body(
        pod_name="dagster-0a1b2c3d-sft-adapter",
        image=IMAGE,
        command=["python", "-m", "lifecycle_dagster.pipes_step"],
        env_vars={"DAGSTER_PIPES_CONTEXT": "e30=", "DAGSTER_PIPES_MESSAGES": "e30="},
        base_pod_meta=meta,
        base_pod_spec=spec,
    )
    pod = {"apiVersion": "v1", "kind": "Pod", **ApiClient().sanitize_for_serialization(body)}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["python", "-m", "lifecycle_dagster.pipes_step"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LIFECYCLE_HOME"] == "/lifecycle" and "DAGSTER_PIPES_CONTEXT" in env
    assert {"name": "lifecycle-home", "mountPath": "/lifecycle"} in container["volumeMounts"]
    claim = {"claimName": "lifecycle-home"}
    assert {"name": "lifecycle-home", "persistentVolumeClaim": claim} in pod["spec"]["volumes"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lifecycle-dagster"
    assert pod["spec"]["restartPolicy"] == "Never"


def test_with_training_pods_the_run_step_that_launches_them_asks_for_no_gpu():
    pod = step_job_pod({"LIFECYCLE_TRAINING": "k8s", "LIFECYCLE_HOME_CLAIM": "lifecycle-home"})
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"memory": "4Gi"}
    assert "nodeSelector" not in pod
    assert {"name": "lifecycle-home", "mountPath": "/lifecycle"} in container["volumeMounts"]
