"""The deployment files: the Kubernetes manifests render (kustomize, where kubectl is installed) and have what the
scale-out needs; every PIXART_* setting they use is a real `pixart serve` flag; the images and the compose file
start the server as PID 1 with a drain window longer than its grace period. (No cluster or Docker daemon here:
this is a schema-and-structure check, not a deployment.)"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pixart_cli import build_parser
from server.observability.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent


def _manifests() -> dict[str, dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    if shutil.which("kubectl"):
        rendered = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True,
                                  check=True, timeout=60).stdout
        docs = list(yaml.safe_load_all(rendered))
    else:
        docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text())]
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict]:
    return _manifests()


def _serve_flags() -> set[str]:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # argparse keeps no public handle on it
    return {opt for action in serve._actions for opt in action.option_strings}


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_every_setting_is_a_serve_flag(k8s) -> None:
    flags = _serve_flags()
    # the CUDA image runs the onnxruntime-gpu tested here, on a base of the CUDA major that build needs
    import onnxruntime

    cuda_image = (DEPLOY / "Dockerfile.cuda").read_text()
    built_for = onnxruntime.capi.build_and_package_info.cuda_version.split(".")[0]
    assert re.search(rf"^FROM nvidia/cuda:{built_for}\.\S+-cudnn-runtime-", cuda_image, re.M)
    assert f'"onnxruntime-gpu=={onnxruntime.__version__}"' in cuda_image
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    names = set(compose["services"]["pixart"]["environment"])
    names |= set(_env(k8s["Deployment/pixart"]["spec"]["template"]["spec"]["containers"][0]))
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        names |= set(re.findall(r"(PIXART_[A-Z_]+)=", (DEPLOY / dockerfile).read_text()))
    for name in names:
        flag = "--" + name.removeprefix("PIXART_").lower().replace("_", "-")
        assert flag in flags, f"{name}: `pixart serve` has no {flag}"


def test_the_deployment_probes_health_requests_a_gpu_and_reads_the_dsn_from_a_secret(k8s) -> None:
    pod = k8s["Deployment/pixart"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051  # the server's default --port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # grpc.health.v1
    assert container["readinessProbe"]["grpc"]["service"] == "pixart.v1.PixArt"
    for kind in ("requests", "limits"):
        assert int(container["resources"][kind]["nvidia.com/gpu"]) == 1
    env = _env(container)
    assert env["PIXART_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "pixart-postgres"
    assert "value" not in env["PIXART_STORE"]
    assert pod["terminationGracePeriodSeconds"] >= float(env["PIXART_GRACE"]["value"]) + 10
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["results"] == env["PIXART_RESULTS"]["value"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert k8s[f"PersistentVolumeClaim/{claims['results']}"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert env["PIXART_ENGINE"]["value"].startswith(mounts["models"])
    # TensorRT writes its engines and timing cache: a writable mount, not the read-only model volume
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    assert any(env["PIXART_TRT_CACHE_DIR"]["value"].startswith(path + "/") for path in writable)
    labels = k8s["Deployment/pixart"]["spec"]["template"]["metadata"]["labels"]
    service = k8s["Service/pixart"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= set(ports)


def test_the_autoscaler_follows_the_exported_queue_depth(k8s) -> None:
    hpa = k8s["HorizontalPodAutoscaler/pixart"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pixart"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "AverageValue"
    exported = Metrics().render().decode()
    assert f"# TYPE {metric['external']['metric']['name']} gauge" in exported


def test_images_and_compose_run_the_server_and_drain_before_the_kill() -> None:
    # the CUDA image: the official CUDA runtime base (cuDNN included), not a devel image
    for dockerfile, base in (("Dockerfile", r"python:3\.11-slim"), ("Dockerfile.cuda", r"nvidia/cuda:\S+-runtime-")):
        text = (DEPLOY / dockerfile).read_text()
        assert re.search(rf"^FROM {base}", text, re.M), dockerfile
        assert 'ENTRYPOINT ["pixart", "serve"]' in text  # exec form: PID 1 gets SIGTERM and drains
        for source in re.findall(r"^COPY (\S+)", text, re.M):
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source} is missing"
    # the CUDA image runs the onnxruntime-gpu tested here, on a base of the CUDA major that build needs
    import onnxruntime

    cuda_image = (DEPLOY / "Dockerfile.cuda").read_text()
    built_for = onnxruntime.capi.build_and_package_info.cuda_version.split(".")[0]
    assert re.search(rf"^FROM nvidia/cuda:{built_for}\.\S+-cudnn-runtime-", cuda_image, re.M)
    assert f'"onnxruntime-gpu=={onnxruntime.__version__}"' in cuda_image
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    pixart = compose["services"]["pixart"]
    assert pixart["deploy"]["replicas"] >= 2
    assert pixart["environment"]["PIXART_STORE"].startswith("postgresql://")
    assert "postgres" in pixart["depends_on"]
    assert int(pixart["stop_grace_period"].rstrip("s")) > int(pixart["environment"]["PIXART_GRACE"])
