"""The deployment files in deploy/ refer to what the code really has: settings, routes, commands, paths.

No cluster runs here, so these checks are what keeps the Kubernetes manifests from drifting away from the code
(a walk-through found a stale batching setting, an HPA metric that counted probes, and pods with no catalog).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


@pytest.fixture(scope="module")
def docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def test_every_setting_the_config_map_sets_is_a_valid_shoprec_setting(docs, monkeypatch):
    data = docs[("ConfigMap", "shoprec-config")]["data"]
    fields = {f"SHOPREC_{name.upper()}" for name in Settings.model_fields} | {"MLFLOW_TRACKING_URI"}
    assert set(data) <= fields, set(data) - fields  # a misspelt name would be ignored silently
    for key, value in data.items():
        monkeypatch.setenv(key, str(value))
    s = Settings()  # every value parses and passes its bounds
    assert s.serve_max_latency_ms == Settings.model_fields["serve_max_latency_ms"].default


def test_serving_pods_read_the_catalog_the_feed_writes(docs):
    var_dir = Path(docs[("ConfigMap", "shoprec-config")]["data"]["SHOPREC_VAR_DIR"])
    catalog_dir = Settings(var_dir=var_dir).catalog_path.parent
    serving, feed = _pod(docs[("Deployment", "shoprec")]), _pod(docs[("Deployment", "shoprec-catalog-feed")])

    def mount(pod: dict, volume: str) -> dict:
        [m] = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume]
        return m

    claims = [{v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}["catalog"]
              for pod in (serving, feed)]
    assert claims == ["shoprec-catalog"] * 2 and ("PersistentVolumeClaim", "shoprec-catalog") in docs
    assert Path(mount(serving, "catalog")["mountPath"]) == catalog_dir and mount(serving, "catalog")["readOnly"]
    assert Path(mount(feed, "catalog")["mountPath"]) == catalog_dir and not mount(feed, "catalog").get("readOnly")
    assert Path(mount(serving, "var")["mountPath"]) == var_dir  # the fallback snapshot is written there
    assert docs[("Deployment", "shoprec-catalog-feed")]["spec"]["replicas"] == 1  # one writer of the file


def test_the_feed_s_command_exists_in_the_image_s_source():
    [container] = yaml.safe_load_all((K8S / "catalog-feed.yaml").read_text()).__next__()["spec"]["template"][
        "spec"]["containers"]
    cmd = container["command"]
    assert cmd[:3] == ["python", "-m", "pipelines.cli"]
    out = subprocess.run([sys.executable, *cmd[1:], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "catalog topic" in out.stdout, out.stderr


def test_probes_ports_and_the_service_agree(docs):
    pod = _pod(docs[("Deployment", "shoprec")])
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert docs[("Service", "shoprec")]["spec"]["ports"][0]["targetPort"] in ports
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in ("/readyz", "/livez") and get["port"] in ports  # BentoML's own probes
    assert container["readinessProbe"]["timeoutSeconds"] >= 3  # /readyz asks the scorer too: 1 s flaps under load


def test_the_autoscaler_counts_client_requests_only():
    text = (K8S / "hpa.yaml").read_text()
    hpa = yaml.safe_load(text)
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"} == {
        "shoprec_requests_per_second"}
    query = next(line for line in text.splitlines() if "metricsQuery" in line)
    assert 'runner_name="shoprec"' in query and "/recommend" in query and "readyz" not in query
