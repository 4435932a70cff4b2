"""What Prometheus needs to watch the RayService, generated beside it by `qbt config build --profile prod`: a
PodMonitor for Ray's metrics port on the head and every worker, and a PrometheusRule with the service's alerts.

The rules name the metrics as Ray exports them (`ray_` + the names in telemetry/metrics.py) and take the error codes
from the error table (api/errors.py), so that a renamed metric or a new 5xx code changes the rules with it.
tests/unit/test_packaging.py runs `promtool check rules` on the groups and `promtool test rules` with
tests/data/alerts-test.yaml, which fires each alert from synthetic series and keeps it quiet on healthy ones.

Scraping: KubeRay names Ray's metrics container port `metrics` on the head and on every worker (it adds it to a
worker that declares none), so one PodMonitor on the service's pod label covers both; the NetworkPolicy opens that
port to the monitoring namespace alone (kuberay.py)."""

from __future__ import annotations

import yaml

from serve_app.api.errors import STATUS
from serve_app.config.kuberay import METRICS_PORT, NAME, POD_LABEL
from serve_app.config.paths import CLUSTER
from serve_app.telemetry import metrics as m

POD_MONITOR = CLUSTER / "monitoring" / "podmonitor.yaml"
RULES = CLUSTER / "monitoring" / "prometheusrule.yaml"
SCRAPE_INTERVAL = "15s"
WINDOW = "5m"  # the rate window of the ratio alerts
SERVER_ERROR_RATIO = 0.05  # of requests answered with a 5xx code (or a stream cut by the upstream)
INSUFFICIENT_FUNDS_RATIO = 0.10  # of requests refused with 402
GUARD_ERROR_RATIO = 0.05  # of guard calls without a verdict
EXPORT_LAG_S = 300  # the age of the oldest ledger row not yet in the SQL ledger
EXPIRY_WINDOW = "15m"  # any reservation expiry in this window is worth a look


def _codes(statuses) -> str:
    return "|".join(sorted(code.value for code, status in STATUS.items() if status in statuses))


def _ratio(selector: str, metric: str = m.REQUESTS) -> str:
    name = m.exported(metric)
    return f"sum(rate({name}{{{selector}}}[{WINDOW}])) / sum(rate({name}[{WINDOW}]))"


def _alert(name: str, expr: str, for_: str | None, severity: str, summary: str, description: str) -> dict:
    """One alert; its annotations are plain text (no `$value`), so that the rules' tests can expect them as they are."""
    rule = {"alert": name, "expr": expr}
    if for_ is not None:
        rule["for"] = for_
    rule["labels"] = {"severity": severity, "service": NAME}
    rule["annotations"] = {"summary": summary, "description": description}
    return rule


def alerts() -> list[dict]:
    server_errors, funds = _codes(range(500, 600)), _codes({402})
    server_selector, funds_selector = f'code=~"{server_errors}"', f'code="{funds}"'
    guard_calls = m.exported(m.GUARD_LATENCY) + "_count"
    return [
        _alert("QbtServerErrorRate", f"{_ratio(server_selector)} > {SERVER_ERROR_RATIO}", "5m",
               "critical", f"Over {SERVER_ERROR_RATIO:.0%} of requests fail on the server side.",
               f"Requests ending with {server_errors.replace('|', ' or ')} (HTTP 5xx, or a stream cut upstream) "
               f"are over {SERVER_ERROR_RATIO:.0%} of all: model replicas, the guard fail-closed, or Redis."),
        _alert("QbtInsufficientFundsRate", f"{_ratio(funds_selector)} > {INSUFFICIENT_FUNDS_RATIO}", "10m",
               "warning", f"Over {INSUFFICIENT_FUNDS_RATIO:.0%} of requests are refused with 402.",
               f"Over {INSUFFICIENT_FUNDS_RATIO:.0%} of requests are refused for insufficient funds: accounts "
               "running dry, or reservations (worst-case cost) too large for the balances."),
        _alert("QbtRedisDown", f"min({m.exported(m.LEDGER_REDIS_UP)}) == 0", "1m", "critical",
               "The ledger exporter cannot reach Redis.",
               "Keys, balances, limits and the ledger stream live in Redis: admission fails (503) while it is "
               "away, and the ledger export stops."),
        _alert("QbtLedgerExportLag", f"max({m.exported(m.LEDGER_EXPORT_LAG)}) > {EXPORT_LAG_S}", "5m", "warning",
               f"The oldest ledger row not yet in the SQL ledger is over {EXPORT_LAG_S} s old.",
               f"The export from the Redis stream to the SQL ledger is over {EXPORT_LAG_S} s behind: the database "
               "is away or slow, or the exporter is failing (its log says which); the stream grows meanwhile."),
        _alert("QbtReservationsExpiring", f"sum(increase({m.exported(m.RESERVATIONS_EXPIRED)}[{EXPIRY_WINDOW}])) > 0",
               None, "warning", f"Reservations expired in the last {EXPIRY_WINDOW}.",
               "A request's reservation outlived its deadline without a settlement and admission reconciled it "
               "(ledger rows with status expired): an ingress died or hung mid-request."),
        _alert("QbtGuardUnavailable", f"sum(rate({m.exported(m.GUARD_ERRORS)}[{WINDOW}])) / "
               f"sum(rate({guard_calls}[{WINDOW}])) > {GUARD_ERROR_RATIO}", "5m", "critical",
               f"Over {GUARD_ERROR_RATIO:.0%} of guard calls get no verdict.",
               "The safety guard times out or fails: fail-closed keys get 502, fail-open keys are served "
               "unscreened (x-qbt-guard: unavailable)."),
    ]


def prometheus_rule() -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
            "spec": {"groups": [{"name": NAME, "rules": alerts()}]}}


def pod_monitor() -> dict:
    """Ray's metrics port on every pod of the service, with the pod's Ray node type and group as labels."""
    relabel = [{"sourceLabels": [f"__meta_kubernetes_pod_label_{label}"], "targetLabel": target}
               for label, target in (("ray_io_node_type", "ray_node_type"), ("ray_io_group", "ray_group"))]
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
            "metadata": {"name": NAME, "labels": {"app.kubernetes.io/name": NAME}},
            "spec": {"selector": {"matchLabels": dict(POD_LABEL)},
                     "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": SCRAPE_INTERVAL,
                                              "relabelings": relabel}]}}


def render_prometheus_rule() -> str:
    header = ("# Generated by `qbt config build --profile prod`; do not edit (see serve_app/config/monitoring.py).\n"
              "# Needs the Prometheus Operator; its ruleSelector must match this object's labels (kube-prometheus-"
              "stack: add\n# `release: <its release>` in an overlay, or set ruleSelectorNilUsesHelmValues=false).\n")
    return header + yaml.safe_dump(prometheus_rule(), sort_keys=False, width=120)


def render_pod_monitor() -> str:
    header = ("# Generated by `qbt config build --profile prod`; do not edit (see serve_app/config/monitoring.py).\n"
              f"# Scrapes Ray's metrics port ({METRICS_PORT}, named `metrics`) on the head and every worker; the "
              "NetworkPolicy admits\n# the monitoring namespace there. kube-prometheus-stack selects it with "
              "`release: <its release>` in an overlay\n# (or podMonitorSelectorNilUsesHelmValues=false).\n")
    return header + yaml.safe_dump(pod_monitor(), sort_keys=False, width=120)
