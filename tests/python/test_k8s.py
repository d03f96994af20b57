"""The Kubernetes manifests: they render with kustomize and every object
validates against the Kubernetes API schemas (kubernetes-validate, strict:
unknown fields are errors). Also checks the network rules the deployment
promises: parties reach only the Flight SQL port."""

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
import kubernetes_validate
from kubernetes_validate.utils import latest_version

from conftest import ROOT, cleanroom_binary

K8S = ROOT / "k8s"
# The oldest Kubernetes the manifests support, and the newest the validator knows.
VERSIONS = ["1.29.0", latest_version()]


def kustomize(path: Path) -> list:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(path)]
    else:
        pytest.fail("neither kustomize nor kubectl is installed (.ci/run installs one)")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("overlay", ["base", "overlays/s3"])
def test_manifests_render_and_validate(overlay):
    docs = kustomize(K8S / overlay)
    kinds = sorted({d["kind"] for d in docs})
    for kind in ["ConfigMap", "Deployment", "NetworkPolicy", "Service", "StatefulSet"]:
        assert kind in kinds, kinds
    for version in VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    print(f"k8s {overlay}: {len(docs)} objects valid for Kubernetes {', '.join(VERSIONS)}")


def by(docs, kind, name):
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} {name}")


def test_only_the_flight_sql_port_is_open_to_parties():
    docs = kustomize(K8S / "overlays/s3")
    public = by(docs, "Service", "cleanroom")
    assert [p["port"] for p in public["spec"]["ports"]] == [50051]
    policies = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    for rule in policies["scheduler"]["spec"]["ingress"]:
        ports = [p["port"] for p in rule["ports"]]
        if "from" not in rule:
            assert ports == [50051], "only Flight SQL is open to everyone"
        elif 50050 in ports:
            assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cleanroom-executor"}}}]
    for rule in policies["executor"]["spec"]["ingress"]:
        assert "from" in rule and all("podSelector" in f for f in rule["from"])
    for rule in policies["etcd"]["spec"]["ingress"]:
        assert "from" in rule
    scheduler = by(docs, "Deployment", "cleanroom-scheduler")["spec"]["template"]["spec"]
    args = scheduler["containers"][0]["args"]
    assert any(a.startswith("--tls-cert=") for a in args) and any(a.startswith("--tls-key=") for a in args)
    secrets = {v["secret"]["secretName"] for v in scheduler["volumes"] if "secret" in v}
    assert secrets == {"cleanroom-tls", "cleanroom-party-credentials"}
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for name in ["cleanroom-scheduler", "cleanroom-executor"]:
        env = by(docs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert env[0]["secretRef"]["name"] in generated, (env, generated)
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "cleanroom", d["metadata"]
    executor_pod = by(docs, "Deployment", "cleanroom-executor")["spec"]["template"]["spec"]
    executor = executor_pod["containers"][0]
    assert executor["resources"]["requests"]["cpu"] and executor["resources"]["requests"]["memory"]
    assert not any("secret" in v for v in executor_pod["volumes"]), "executors hold no party credentials"
    assert any(a.startswith("--external-host=") for a in executor["args"])


def test_the_shipped_manifest_is_a_valid_collaboration(tmp_path):
    """The ConfigMap's manifest passes `cleanroom manifest check` once the
    credential files it names exist."""
    text = (K8S / "base" / "manifest.toml").read_text()
    for party in ["advertiser", "adnetwork"]:
        phc = subprocess.run([str(cleanroom_binary()), "manifest", "hash-password"], input="pw-" + party + "\n",
                             capture_output=True, text=True, check=True).stdout.strip()
        (tmp_path / party).write_text(phc + "\n")
        text = text.replace(f"/etc/cleanroom/credentials/{party}", str(tmp_path / party))
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(text)
    result = subprocess.run([str(cleanroom_binary()), "manifest", "check", str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
