"""The spec's gateway parts: a promotion section and a traffic:<route> dataset source."""

import pytest
import yaml

from llamaduo.cli.preflight import preflight
from llamaduo.contracts.spec import load_spec, parse_spec
from llamaduo.errors import SpecError

BASE = {"task": {"name": "triage", "oracle": "llamaduo.tasks.triage:oracle"},
        "dataset": {"source": "traffic:invoice"}, "student": {"base_model": "tiny:llama", "method": "full"}}


def test_a_traffic_source_with_its_window_is_valid():
    spec = parse_spec({**BASE, "dataset": {"source": "traffic:invoice", "traffic": {
        "since_hours": 48, "max_rows": 500, "sample_fraction": 0.5, "seed": 3}}})
    assert spec.dataset.traffic_route == "invoice" and spec.dataset.traffic.max_rows == 500
    assert parse_spec(BASE).dataset.traffic is None  # defaults apply when left out


@pytest.mark.parametrize(("dataset", "message"), [
    ({"source": "traffic:../secrets"}, "route name"),
    ({"source": "traffic:"}, "route name"),
    ({"source": "data.jsonl", "traffic": {}}, "dataset.traffic is set but"),
    ({"source": "traffic:invoice", "traffic": {"sample_fraction": 0}}, "sample_fraction"),
    ({"source": "traffic:invoice", "traffic": {"since_hours": -1}}, "since_hours"),
])
def test_bad_traffic_sources_are_named(dataset, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**BASE, "dataset": dataset})


def test_promotion_section():
    spec = parse_spec({**BASE, "promotion": {"route": "invoice", "mode": "canary", "canary_percent": 5}})
    assert (spec.promotion.route, spec.promotion.mode, spec.promotion.canary_percent) == ("invoice", "canary", 5)
    assert parse_spec(BASE).promotion is None
    for bad, message in (({"route": "a/b"}, "route name"), ({"route": "x", "canary_percent": 0}, "canary_percent"),
                         ({"route": "x", "mode": "off"}, "mode"), ({"route": "x", "when": "now"}, "when")):
        with pytest.raises(SpecError, match=message):
            parse_spec({**BASE, "promotion": bad})


def test_a_traffic_source_is_not_a_path_and_is_checked_at_start(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(BASE))
    spec = load_spec(path)
    assert spec.dataset.source == "traffic:invoice"  # not resolved against the spec's folder
    checked = preflight(spec)
    assert not [p for p in checked.problems if "dataset" in p], checked.problems
    assert any("traffic:invoice" in note and "captured traffic" in note for note in checked.unchecked)
