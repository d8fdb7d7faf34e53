"""docs/grafana-dashboard.json names only metrics the custodian and the enclave export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from custodian.metrics import CustodianMetrics
from enclave._daemon.metrics import DaemonMetrics

DASHBOARD = Path(__file__).parents[4] / "docs" / "grafana-dashboard.json"


def _exported() -> set[str]:
    names = set()
    for registry in (CustodianMetrics().registry, DaemonMetrics().registry):
        for metric in registry.collect():
            names.update(sample.name for sample in metric.samples)
            names.add(metric.name)
    return names


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for expr in exprs for name in re.findall(r"custos_[a-z0-9_]+", expr)}
    exported = _exported()
    # Labelled gauges have no sample until a label is set: their family names count.
    families = {re.sub(r"_(bucket|total|count|sum)$", "", n) for n in exported}
    missing = {n for n in used if n not in exported and re.sub(r"_(bucket|total)$", "", n) not in families}
    assert not missing
    assert len(used) >= 25
