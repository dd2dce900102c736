"""The Kubernetes manifests, checked offline: rendered by `kubectl kustomize` (client only, no
cluster), every object validated strictly against the real Kubernetes schemas that
`kubernetes-validate` bundles, a broken manifest refused by the same check, and the probes, port and
secrets tied to what the server really does."""

import copy
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from registry.guards import OPEN_ROUTES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KSERVE = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
KUBERNETES_VERSION = "1.33.0"
EXPECTED_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


def validate(document: dict) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (the client) is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(documents: list[dict], kind: str) -> dict:
    return next(doc for doc in documents if doc["kind"] == kind)


def test_every_rendered_object_is_valid_kubernetes(rendered):
    assert {doc["kind"] for doc in rendered} == EXPECTED_KINDS
    for document in rendered:
        validate(document)


@pytest.mark.parametrize(
    ("path", "value", "words"),
    [
        (("spec", "replicas"), "two", "is not of type 'integer'"),
        (("spec", "template", "spec", "containers", 0, "resources", "limit"), {"cpu": "2"},
         "Additional properties are not allowed"),
        (("spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"), "http",
         "is not of type 'integer'"),
    ],
)  # fmt: skip
def test_a_broken_manifest_is_refused_by_the_same_check(rendered, path, value, words):
    broken = copy.deepcopy(by_kind(rendered, "Deployment"))
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(words)):
        validate(broken)


def test_the_deployment_probes_open_routes_runs_unprivileged_and_reads_the_token_from_a_secret(
    rendered,
):
    deployment = by_kind(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    probes = [container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")]
    assert all(path in OPEN_ROUTES for path in probes)  # a probe carries no token
    assert pod["securityContext"]["runAsNonRoot"] is True
    user, group = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE.read_text(), re.M).groups()
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(user),
        int(group),
    )  # the image's own user, so files it owns stay readable
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port
    assert f"EXPOSE {port}" in CONTAINERFILE.read_text()
    token_file = args[args.index("--token-file") + 1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(Path(token_file).parent)])
    assert volume["secret"]["secretName"] == "cifar10-serve-token"
    assert "/tmp" in mounts  # the only writable place
    service, pdb = by_kind(rendered, "Service"), by_kind(rendered, "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        by_kind(rendered, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"]
        == (deployment["metadata"]["name"])
    )


def test_no_manifest_carries_a_secret_and_kserve_uses_the_same_image_and_probes(rendered):
    for path in [*K8S.glob("*.yaml"), KSERVE]:
        for document in yaml.safe_load_all(path.read_text()):
            assert document.get("kind") != "Secret", path
        assert not re.search(r"(?i)bearer\s+\w|token:\s*\S{8,}", path.read_text()), path
    service = yaml.safe_load(KSERVE.read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    (container,) = service["spec"]["predictor"]["containers"]
    deployment = by_kind(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == deployment["image"].split(":")[0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in OPEN_ROUTES
    # KServe's schema is a CRD that kubernetes-validate does not bundle: the container itself is
    # checked as a core v1 container.
    validate(
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "kserve-predictor"},
         "spec": {"containers": [container], "volumes": service["spec"]["predictor"]["volumes"]}}
    )  # fmt: skip
