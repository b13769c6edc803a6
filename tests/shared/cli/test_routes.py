"""``llamaduo promote`` / ``llamaduo rollback``: the adapter a promotion records, and rollback undoing the last
change (real nats-server and S3 server)."""

from __future__ import annotations

import uuid

from llamaduo.cli.routes import change_route, promote_route
from llamaduo.contracts.routes import rollback
from llamaduo.storage.keys import migration_key


async def test_promote_records_the_completed_model_and_keeps_it_from_canary_to_full(settings, store):
    route = "cli-" + uuid.uuid4().hex[:6]
    done, other = "m-" + uuid.uuid4().hex[:6], "m-" + uuid.uuid4().hex[:6]
    model = {"key": f"migrations/{done}/round-1/adapter", "sha256": "c" * 64}
    store.put_json(migration_key(done, "report.json"), {"migration_id": done, "model": model})

    _, canary = await promote_route(settings, route, done, "canary", 10, local_model="invoice-1")
    assert (canary.adapter_key, canary.adapter_sha256, canary.local_model) == (
        model["key"], model["sha256"], "invoice-1")
    # canary -> full of the same version, nothing else given: the adapter and the served name stay
    _, full = await promote_route(settings, route, done, "full", None)
    assert (full.mode, full.adapter_key, full.adapter_sha256, full.local_model) == (
        "full", model["key"], model["sha256"], "invoice-1")
    # a version with no report (not a completed migration here): no adapter (the local server serves it)
    _, plain = await promote_route(settings, route, other, "full", None)
    assert (plain.adapter_key, plain.adapter_sha256, plain.local_model) == (None, None, other)

    # rollbacks undo one change each: back to full, then to the canary at its share, then off
    states = []
    for _ in range(3):
        states.append((await change_route(settings, route, lambda s: rollback(s), reason="rollback",
                                          actor="test"))[1])
    assert [(s.version, s.mode, s.percent) for s in states] == [
        (done, "full", 100), (done, "canary", 10), (None, "off", 0)]
    assert states[1].adapter_sha256 == model["sha256"] and states[1].local_model == "invoice-1"
