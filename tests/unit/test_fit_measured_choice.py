"""Measured fit against the estimate (rbee/fit.py ``need``, rbee_queen/survey.py
``model_need`` and ``fit_rows``): a hive's measurement replaces the estimate
only where its settings (backend, dtype, slots, context) are the estimate's,
and only on the node that measured it."""

from __future__ import annotations

import json

from rbee.fit import MEASURED_KEY, MiB, estimate, measurements, need
from rbee.v1 import provisioning_pb2
from rbee_queen.nodes.store import NodeRecord
from rbee_queen.survey import Dispatched, NodeFigures, fit_rows, model_need, views

FIGURES = {"fit.weights_bytes": str(100 * MiB), "fit.stored_dtype": "bfloat16", "fit.dtype": "float32", "fit.layers": "30",
           "fit.kv_heads": "3", "fit.head_dim": "64", "fit.context": "8192", "fit.vocab": "49152"}  # fmt: skip


def measured(peak: int, **settings) -> dict:
    return {"backend": "cpu", "dtype": "float32", "slots": 8, "context": 2048, "peak_bytes": peak,
            "device_peak_bytes": 0, "measured_at_unix": 1_700_000_000, "full_load": True, **settings}  # fmt: skip


def meta(*items: dict) -> dict[str, str]:
    return {**FIGURES, MEASURED_KEY: json.dumps(list(items))} if items else dict(FIGURES)


def test_the_measurement_with_the_estimates_settings_replaces_it() -> None:
    est = estimate(FIGURES, 0)
    assert (est.dtype, est.slots, est.context) == ("float32", 8, 2048)
    chosen = need(est, [meta(measured(2500 * MiB))])
    assert chosen.basis == "measured" and chosen.total == 2500 * MiB and chosen.estimate == est


def test_a_peak_below_the_estimate_counts_only_when_it_was_taken_at_full_load() -> None:
    # A worker that never had every slot busy did not hold a full batch's logits:
    # its lower peak would place a worker where a full batch does not fit.
    est = estimate(FIGURES, 0)
    assert need(est, [meta(measured(2500 * MiB, full_load=False))]).basis == "estimate"
    above = need(est, [meta(measured(est.total + 100 * MiB, full_load=False))])
    assert above.basis == "measured" and above.total == est.total + 100 * MiB
    assert need(est, [meta(measured(2500 * MiB, full_load="yes"))]).basis == "estimate"  # only a JSON true is true


def test_other_settings_leave_the_estimate() -> None:
    est = estimate(FIGURES, 0)
    for other in ({"slots": 4}, {"context": 1024}, {"dtype": "bfloat16"}, {"backend": "cuda"}):
        chosen = need(est, [meta(measured(2500 * MiB, **other))])
        assert chosen.basis == "estimate" and chosen.total == est.total, other
    # Asked for 4 slots, the 4-slot measurement is the one.
    four = estimate(FIGURES, 0, slots=4)
    assert need(four, [meta(measured(2500 * MiB), measured(1900 * MiB, slots=4))]).total == 1900 * MiB


def test_the_first_listing_with_a_match_wins_and_within_it_the_highest_peak() -> None:
    est = estimate(FIGURES, 0)
    own, other = meta(measured(2000 * MiB), measured(2100 * MiB)), meta(measured(3000 * MiB))
    assert need(est, [own, other]).total == 2100 * MiB
    assert need(est, [meta(), other]).total == 3000 * MiB


def test_on_a_gpu_the_dtype_is_the_devices_choice() -> None:
    est = estimate(FIGURES, 0, backend="cuda", slots=32)
    chosen = need(est, [meta(measured(900 * MiB, backend="cuda", dtype="bfloat16", slots=32, device_peak_bytes=3000 * MiB))], "cuda")
    assert chosen.basis == "measured" and chosen.measured is not None and chosen.measured.device_bytes == 3000 * MiB


def test_a_malformed_listing_is_the_estimate_not_an_error() -> None:
    est = estimate(FIGURES, 0)
    bad = ["not json", "{}", json.dumps([1, "x", None]), json.dumps([measured(-5)]), json.dumps([measured(True)]),
           json.dumps([measured(10, slots="8")]), json.dumps([measured(0)]), json.dumps([{**measured(10), "dtype": 3}])]  # fmt: skip
    for text in bad:
        listing = {**FIGURES, MEASURED_KEY: text}
        assert measurements(listing) == [] and need(est, [listing]).basis == "estimate", text
    # At most 16 entries are read.
    many = {**FIGURES, MEASURED_KEY: json.dumps([measured(MiB * (i + 1), slots=i + 1) for i in range(40)])}
    assert len(measurements(many)) == 16


def node(name: str, free: int, metadata: dict[str, str] | None) -> NodeFigures:
    entry = provisioning_pb2.ModelEntry(model_ref="hf:org/m", size_bytes=100 * MiB, metadata=metadata) if metadata is not None else None
    return NodeFigures(NodeRecord(name=name, transport="local", install_path="/opt/rbee", hive_key="k"), free_bytes=free, model=entry)


def test_the_queen_uses_a_nodes_own_measurement_and_says_so() -> None:
    # a measured 2500 MiB, b holds the model unmeasured, c does not hold it:
    # b and c use the estimate (c from a's files): a measurement is that machine's.
    surveyed = [node("a", 3000 * MiB, meta(measured(2500 * MiB))), node("b", 3000 * MiB, meta()), node("c", 3000 * MiB, None)]
    est = estimate(FIGURES, 100 * MiB)
    assert est.total > 3000 * MiB  # the estimate does not fit in 3000 MiB; the measurement does
    assert [model_need(surveyed, f, "cpu", 0).basis for f in surveyed] == ["measured", "estimate", "estimate"]  # type: ignore[union-attr]
    nodes, _, _ = views(surveyed, "hf:org/m", "cpu", 0, 0, Dispatched())
    assert [(v.name, v.fits, v.need_bytes) for v in nodes] == [("a", True, 2500 * MiB), ("b", False, est.total), ("c", False, est.total)]
    rows = {r.node: r for r in fit_rows(surveyed, nodes, "cpu", 0)}
    a, b = rows["a"], rows["b"]
    assert a.estimated and a.measured and a.need_bytes == 2500 * MiB and a.line == "a: fits, 0.5 GiB to spare"
    assert a.weights_bytes + a.kv_cache_bytes + a.overhead_bytes == est.total  # the estimate stays for comparison
    assert b.estimated and not b.measured and b.need_bytes == est.total
    # Asked for 2 slots, a's 8-slot measurement is not used.
    nodes2, _, _ = views(surveyed, "hf:org/m", "cpu", 0, 2, Dispatched())
    assert not fit_rows(surveyed, nodes2, "cpu", 2)[0].measured
