"""The optional monitoring: the Prometheus Operator component and the Grafana dashboard.

The component (deploy/k8s/components/monitoring) is enabled the way deploy/README.md says, by a
``components:`` entry in an overlay, on a copy of deploy/k8s, and every variant is rendered with
it. The PodMonitor must scrape the port and path the pods really serve /metrics on. Every PromQL
expression, in the alerts and in the dashboard, is parsed by a real PromQL parser (types and
function signatures checked) and may name only series the service's own registry exports, or
the few kube-state-metrics and Prometheus series named here, with labels those series carry.
The Operator's kinds are CRDs, outside kubernetes-validate's schemas: their shape is checked
here. Like tests/test_deploy_manifests.py, this needs kubectl and is skipped locally without it.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.app import create_app
from service.settings import Settings
from tests.test_deploy_manifests import (
    DEPLOY,
    K8S,
    K8S_VERSION,
    VARIANTS,
    Doc,
    _adjust_list,
    _cluster_specific_values,
    _container,
    _group,
    _one,
    _pod_labels,
    _pod_spec,
    _selects,
    import_or_unavailable,
    kubectl_or_unavailable,
    kustomize,
)

pytestmark = pytest.mark.k8s

COMPONENT = K8S / "components" / "monitoring"
DASHBOARD = DEPLOY / "grafana" / "chat-gateway.json"
DEPLOY_README = DEPLOY / "README.md"
MONITORING_GROUP = "monitoring.coreos.com"
# Where deploy/README.md says to enable the component, per variant: (overlay, entry).
# The ingress-nginx variant includes overlays/prod, so it gets the component from there.
ENABLED_IN = {
    "dev": ("overlays/dev", "../../components/monitoring"),
    "prod": ("overlays/prod", "../../components/monitoring"),
    "ingress-nginx": ("overlays/prod", "../../components/monitoring"),
}

# Labels Prometheus and the Operator put on every scraped series of a pod.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})
# Series from outside the service that the alerts may read: kube-state-metrics' (with their
# labels) and Prometheus' own `up`.
KSM_SERIES = {
    "kube_pod_deletion_timestamp": frozenset({"namespace", "pod", "uid"}),
    "kube_pod_status_ready": frozenset({"namespace", "pod", "uid", "condition"}),
    "kube_deployment_status_replicas_available": frozenset({"namespace", "deployment"}),
}
PROMETHEUS_SERIES = {"up": TARGET_LABELS}
SEVERITIES = {"critical", "warning", "info"}
# Prometheus' duration syntax (model.ParseDuration), as the CRD's pattern.
PROM_DURATION = re.compile(
    r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"
)
DURATION_S = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
# What an alert's annotation templates may contain: a label of the alert, or its value.
TEMPLATE = re.compile(
    r"^\$labels\.([a-z_]+)$|^\$value(?: \| (?:humanize|humanizePercentage|humanizeDuration))?$"
)
PODMONITOR_SPEC_KEYS = {"jobLabel", "selector", "namespaceSelector", "podMetricsEndpoints"}
ENDPOINT_KEYS = {"port", "portNumber", "path", "interval", "scrapeTimeout", "scheme"}
RULE_KEYS = {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}


# --------------------------------------------------------------------------------------------
# What the service exports


def _exported_series() -> dict[str, frozenset[str]]:
    """Every series name the service's /metrics can carry, with the label names it can have.

    Names come from the registry's collectors (a histogram is its ``_bucket``, ``_count`` and
    ``_sum``, a counter its ``_total``); label names from the metric objects, whose series may
    not exist yet (a labelled metric has none until it is first used)."""
    metrics = importlib.import_module("service.metrics")
    importlib.import_module("service.store")  # its operations' series are made at import
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    declared = {
        obj._name: frozenset(obj._labelnames)  # prometheus-client keeps them only privately
        for obj in vars(metrics).values()
        if hasattr(obj, "_labelnames") and hasattr(obj, "_name")
    }
    series: dict[str, frozenset[str]] = {}
    for family in metrics.REGISTRY.collect():
        labels = declared.get(family.name, frozenset()).union(
            *(sample.labels for sample in family.samples)
        )
        for suffix in suffixes.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = labels | extra | TARGET_LABELS
    return series


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    series = _exported_series()
    assert "gateway_turns_total" in series and "process_cpu_seconds_total" in series
    return series


@pytest.fixture(scope="module")
def promql() -> ModuleType:
    return import_or_unavailable("promql_parser", "promql-parser")


def _selectors(promql: ModuleType, expr: str) -> list[tuple[str, dict[str, str]]]:
    """Parse ``expr`` (a ValueError names what is wrong) and return each vector selector's
    metric name with its label matchers."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            matchers = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name or matchers.get("__name__", ""), matchers))

    promql.walk(promql.parse(expr), visit)
    return found


def _grouping_labels(promql: ModuleType, expr: str) -> set[str]:
    labels: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
            labels.update(node.modifier.labels)
        if isinstance(node, promql.BinaryExpr) and node.modifier and node.modifier.matching:
            labels.update(node.modifier.matching.labels)

    promql.walk(promql.parse(expr), visit)
    return labels


def _check_expression(
    promql: ModuleType, expr: str, known: dict[str, frozenset[str]], job: str | None
) -> list[str]:
    """What is wrong with one expression: unknown series, unknown labels, and (unless ``job``
    is None) a series of the pods that does not select their ``job``."""
    problems = []
    try:
        selectors = _selectors(promql, expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    if not selectors:
        problems.append("selects no series")
    for name, matchers in selectors:
        if name not in known:
            problems.append(f"{name} is not a series the service or kube-state-metrics exports")
            continue
        unknown = set(matchers) - known[name] - {"__name__"}
        if unknown:
            problems.append(f"{name} has no label {sorted(unknown)}")
        scraped = name == "up" or name.startswith(("gateway_", "process_"))
        if job is not None and scraped and matchers.get("job") != job:
            problems.append(f'{name} must select job="{job}", the PodMonitor\'s job')
    return problems


def _duration_s(text: str) -> float:
    assert PROM_DURATION.match(text) and text, f"{text!r} is not a Prometheus duration"
    return sum(int(n) * DURATION_S[u] for n, u in re.findall(r"(\d+)(ms|[ywdhms])", text))


# --------------------------------------------------------------------------------------------
# Rendering the variants as they are, and with the component enabled as deploy/README.md says


@pytest.fixture(scope="module")
def k8s_validate() -> ModuleType:
    return import_or_unavailable("kubernetes_validate", "kubernetes-validate>=1.33")


@pytest.fixture(scope="module")
def render_with(
    k8s_validate: ModuleType, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, bool], list[Doc]]:
    """Render a variant as it is, or with the component enabled in a copy of deploy/k8s."""
    kubectl = kubectl_or_unavailable()
    yaml_module = import_or_unavailable("yaml", "PyYAML")
    rendered: dict[tuple[str, bool], list[Doc]] = {}

    def _render(variant: str, monitoring: bool) -> list[Doc]:
        if (variant, monitoring) in rendered:
            return rendered[variant, monitoring]
        root = K8S
        if monitoring:
            root = tmp_path_factory.mktemp(f"k8s-{variant}") / "k8s"
            shutil.copytree(K8S, root)
            overlay, entry = ENABLED_IN[variant]
            kustomization = root / overlay / "kustomization.yaml"
            assert "components:" not in kustomization.read_text(), "enabled by default?"
            with kustomization.open("a") as out:
                out.write(f"\ncomponents:\n  - {entry}\n")
        path = root / VARIANTS[variant].relative_to(K8S)
        rendered[variant, monitoring] = kustomize(kubectl, yaml_module, path)
        return rendered[variant, monitoring]

    return _render


@pytest.fixture(scope="module")
def render_monitored(render_with) -> Callable[[str], list[Doc]]:
    return lambda variant: render_with(variant, True)


@pytest.fixture(params=sorted(VARIANTS))
def monitored(request: pytest.FixtureRequest, render_monitored) -> list[Doc]:
    return render_monitored(str(request.param))


@pytest.fixture
def rule_docs(render_monitored) -> list[Doc]:
    return render_monitored("prod")


def _rules(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    for group in _one(docs, "PrometheusRule")["spec"]["groups"]:
        for rule in group["rules"]:
            yield group["name"], rule


def _podmonitor_job(docs: list[Doc]) -> str:
    """The job label the PodMonitor gives the series: the value of its jobLabel on the pods."""
    monitor = _one(docs, "PodMonitor")
    label = monitor["spec"].get("jobLabel")
    assert label, "without jobLabel the job is '<namespace>/<name>': different per environment"
    job = _pod_labels(docs).get(label)
    assert job, f"the pods have no label {label} for the PodMonitor's jobLabel"
    return job


# --------------------------------------------------------------------------------------------
# The component


def test_the_default_variants_need_no_prometheus_operator(render_with) -> None:
    """The monitoring kinds are CRDs: the base and the overlays must apply without them."""
    for variant in VARIANTS:
        groups = {_group(d) for d in render_with(variant, False)}
        assert MONITORING_GROUP not in groups, f"{variant} renders Prometheus Operator objects"


def test_the_component_renders_with_every_variant(
    monitored: list[Doc], k8s_validate: ModuleType
) -> None:
    monitor, rule = _one(monitored, "PodMonitor"), _one(monitored, "PrometheusRule")
    app_namespace = _one(monitored, "Deployment")["metadata"]["namespace"]
    for doc in (monitor, rule):
        assert doc["apiVersion"] == f"{MONITORING_GROUP}/v1"
        assert doc["metadata"]["name"]
        assert doc["metadata"]["namespace"] == app_namespace, "the overlay's namespace applies"
    core = [d for d in monitored if _group(d) != MONITORING_GROUP]
    assert len(core) == len(monitored) - 2, "the component adds exactly its two objects"
    for doc in core:
        if _group(doc) == "gateway.networking.k8s.io":
            continue  # the HTTPRoute: checked in test_deploy_manifests.py
        k8s_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_component_adds_no_placeholder_the_adjust_list_misses(monitored: list[Doc]) -> None:
    spans = _adjust_list()
    values = _cluster_specific_values(monitored)
    assert not sorted(v for v in values if not any(v in s for s in spans))


def test_the_podmonitor_scrapes_the_port_and_path_the_pods_serve_metrics_on(
    monitored: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = _one(monitored, "PodMonitor")
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_SPEC_KEYS, f"unknown PodMonitor fields {set(spec)}"
    assert _selects(spec["selector"], _pod_labels(monitored))
    namespaces = spec.get("namespaceSelector", {})
    assert not namespaces.get("any"), "scrape the app's own namespace only"
    assert namespaces.get("matchNames", [monitor["metadata"]["namespace"]]) == [
        monitor["metadata"]["namespace"]
    ]
    _podmonitor_job(monitored)

    ports = {p["name"]: p["containerPort"] for p in _container(monitored)["ports"] if "name" in p}
    monkeypatch.chdir(tmp_path)  # no stray .env
    app = create_app(Settings(_env_file=None))
    served = {r.resource.canonical for r in app.router.routes() if r.method == "GET"}
    endpoints = spec["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert set(endpoint) <= ENDPOINT_KEYS, f"unknown podMetricsEndpoints fields {endpoint}"
        if "port" in endpoint:
            assert endpoint["port"] in ports, f"no container port named {endpoint['port']}"
        else:
            assert endpoint["portNumber"] in ports.values()
        assert endpoint.get("scheme", "http") == "http"
        assert endpoint.get("path", "/metrics") in served, "the app does not serve that path"
        interval = _duration_s(endpoint.get("interval", "30s"))
        assert _duration_s(endpoint.get("scrapeTimeout", "10s")) <= interval
    # Prometheus (in the `monitoring` namespace) may reach that port.
    policy = _one(monitored, "NetworkPolicy")
    scraped = {ports.get(e.get("port"), e.get("portNumber")) for e in endpoints}
    admitted = {
        p["port"]
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "monitoring"
        for p in rule["ports"]
    }
    assert scraped <= admitted


# --------------------------------------------------------------------------------------------
# The alerts


def test_every_alert_is_well_formed(rule_docs: list[Doc]) -> None:
    rule = _one(rule_docs, "PrometheusRule")
    groups = rule["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    seen = set()
    for group_name, alert in _rules(rule_docs):
        what = f"{group_name}/{alert.get('alert')}"
        assert set(alert) <= RULE_KEYS, f"{what}: unknown fields {set(alert) - RULE_KEYS}"
        assert re.fullmatch(r"ChatGateway[A-Za-z0-9]+", alert["alert"]), what
        assert isinstance(alert["expr"], str) and alert["expr"].strip(), what
        assert _duration_s(alert["for"]) > 0, f"{what}: an alert needs a `for:`"
        severity = alert["labels"]["severity"]
        assert severity in SEVERITIES, f"{what}: severity {severity}"
        assert (alert["alert"], severity) not in seen, f"{what} twice with severity {severity}"
        seen.add((alert["alert"], severity))
        annotations = alert["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), what


def test_annotations_template_only_labels_the_alert_has(
    rule_docs: list[Doc], promql: ModuleType
) -> None:
    for _group_name, alert in _rules(rule_docs):
        labels = _grouping_labels(promql, alert["expr"])
        for text in alert["annotations"].values():
            for template in re.findall(r"{{\s*(.*?)\s*}}", text):
                found = TEMPLATE.match(template)
                assert found, f"{alert['alert']}: unexpected template {{{{ {template} }}}}"
                if found.group(1):
                    assert found.group(1) in labels, (
                        f"{alert['alert']}: $labels.{found.group(1)} is not among the labels "
                        f"the expression keeps ({sorted(labels)})"
                    )


def test_alert_expressions_parse_and_read_only_exported_series(
    rule_docs: list[Doc], promql: ModuleType, exported: dict[str, frozenset[str]]
) -> None:
    known = {**exported, **KSM_SERIES, **PROMETHEUS_SERIES}
    job = _podmonitor_job(rule_docs)
    problems = []
    for _group_name, alert in _rules(rule_docs):
        for problem in _check_expression(promql, alert["expr"], known, job):
            problems.append(f"{alert['alert']} ({alert['labels']['severity']}): {problem}")
    assert not problems, "\n".join(problems)


def test_the_alerts_cover_what_an_operator_must_know(rule_docs: list[Doc]) -> None:
    names = {alert["alert"] for _group_name, alert in _rules(rule_docs)}
    assert {
        "ChatGatewayTurnsFailing",
        "ChatGatewayUpstreamErrors",
        "ChatGatewayMongoDBSlow",
        "ChatGatewayMongoDBErrors",
        "ChatGatewayStreamsStuck",
        "ChatGatewayPodTerminatingTooLong",
        "ChatGatewayNotScraped",
    } <= names


def test_alert_windows_fit_the_service_deadlines_and_the_drain(rule_docs: list[Doc]) -> None:
    """Streams count as stuck only after longer than a turn may last; a pod is terminating too
    long only after more than its grace period."""
    alerts = {(a["alert"], a["labels"]["severity"]): a for _g, a in _rules(rule_docs)}
    stuck = alerts["ChatGatewayStreamsStuck", "warning"]["expr"]
    window = re.search(r"\[(\w+):\w+\]", stuck)
    assert window, "the stuck-streams rule looks at a window of the live-stream gauge"
    config = _one(rule_docs, "ConfigMap")["data"]
    defaults = Settings.model_fields
    longest_turn = sum(
        float(config.get(name.upper(), defaults[name].default))
        for name in ("upstream_first_token_timeout_s", "upstream_total_timeout_s")
    )
    assert _duration_s(window.group(1)) > longest_turn
    assert f"[{window.group(1)}]" in stuck, "turns ending are counted over the same window"

    terminating = alerts["ChatGatewayPodTerminatingTooLong", "warning"]["expr"]
    threshold = re.search(r"kube_pod_deletion_timestamp\)\)\s*>\s*(\d+)", terminating)
    assert threshold
    grace = _pod_spec(rule_docs)["terminationGracePeriodSeconds"]
    assert int(threshold.group(1)) > grace


def _turns_by_outcome(promql: ModuleType, expr: str) -> list[tuple[str, str] | None]:
    """Each gateway_turns_total selector's outcome matcher in ``expr``: (operator, value), or
    None for a selector of every outcome."""
    found: list[tuple[str, str] | None] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector) and node.name == "gateway_turns_total":
            outcome = [m for m in node.matchers.matchers if m.name == "outcome"]
            found.append((str(outcome[0].op), outcome[0].value) if outcome else None)

    promql.walk(promql.parse(expr), visit)
    return found


def test_interrupted_turns_fail_turns_and_do_not_unstick_a_pod(
    rule_docs: list[Doc], promql: ModuleType
) -> None:
    """A turn whose pod died is counted interrupted by the pod that settles it (deploy/README.md,
    Monitoring): it is a failing turn to ChatGatewayTurnsFailing, and no sign that the settling
    pod's own streams progress to ChatGatewayStreamsStuck."""
    alerts = {(a["alert"], a["labels"]["severity"]): a["expr"] for _g, a in _rules(rule_docs)}
    failing = ("MatchOp.Re", "failed|interrupted")
    for severity in ("warning", "critical"):
        turns = _turns_by_outcome(promql, alerts["ChatGatewayTurnsFailing", severity])
        assert sorted(turns, key=str) == sorted([failing, None, None], key=str), severity
    stuck = _turns_by_outcome(promql, alerts["ChatGatewayStreamsStuck", "warning"])
    assert stuck == [("MatchOp.NotEqual", "interrupted")]


def test_every_alert_has_a_runbook_line_in_deploy_readme(rule_docs: list[Doc]) -> None:
    readme = DEPLOY_README.read_text()
    runbook = re.search(r"^### Runbook\n(.*?)(?=^##|\Z)", readme, re.S | re.M)
    assert runbook, "deploy/README.md has no '### Runbook' section"
    for name in sorted({alert["alert"] for _group_name, alert in _rules(rule_docs)}):
        assert re.search(rf"^- \*\*{name}\*\*", runbook.group(1), re.M), (
            f"no runbook line '- **{name}**' in deploy/README.md"
        )


# --------------------------------------------------------------------------------------------
# The Grafana dashboard (no kubectl needed, but the same parser)


def _dashboard() -> Doc:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(dashboard: Doc) -> Iterator[Doc]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")


def test_the_dashboard_has_a_prometheus_datasource_variable_and_sane_panels() -> None:
    dashboard = _dashboard()
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(datasource) == 1 and datasource[0]["query"] == "prometheus"
    ds_ref = f"${{{datasource[0]['name']}}}"
    ids, cells = set(), set()
    for panel in _panels(dashboard):
        assert panel["id"] not in ids, f"panel id {panel['id']} twice"
        ids.add(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), "every panel says what it shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": ds_ref}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(set(refs)) == len(refs), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    for name, variable in variables.items():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": ds_ref}, name


def test_dashboard_queries_parse_and_read_only_exported_series(
    promql: ModuleType, exported: dict[str, frozenset[str]]
) -> None:
    dashboard = _dashboard()
    variables = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    problems, used = [], set()
    queries = [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*), *(\w+)\)", variable["query"])
            assert inner, f"variable {variable['name']}: use label_values(selector, label)"
            queries.append((f"${variable['name']}", inner.group(1)))
    for title, expr in queries:
        for name in re.findall(r"\$\{?(\w+)", expr):
            if name not in variables:
                problems.append(f"{title}: ${name} is not a dashboard variable")
        # The user picks the job ($job), whose list of values cannot itself select one.
        job = None if title == "$job" else "$job"
        found = _check_expression(promql, _grafana_to_promql(expr), exported, job)
        problems += [f"{title}: {p}" for p in found]
        used |= {name for name, _ in _selectors(promql, _grafana_to_promql(expr))}
    assert not problems, "\n".join(problems)
    # Every metric of the service is on the dashboard (a histogram by any of its series).
    families = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in exported}
    shown = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in used}
    missing = sorted(f for f in families - shown if f.startswith("gateway_"))
    assert not missing, f"metrics the dashboard does not show: {missing}"
    assert {"process_cpu_seconds", "process_resident_memory_bytes"} <= shown
