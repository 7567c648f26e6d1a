"""Measured links without processes: the estimator on transport samples, and LinkWatch's fold /
change / probe decisions on synthetic step reports (the runtime path is tests/test_runtime.py's
slow-link run)."""

import pytest

from skippipe.cost import CostModel
from skippipe.model.presets import ModelSpec
from skippipe.plan import Plan
from skippipe.runtime.inject import slow_links_at
from skippipe.runtime.links import CONFIRM_STEPS, LinkWatch, step_links
from skippipe.runtime.transport import LinkSample, link_estimates
from skippipe.runtime.wire import NodeReport
from skippipe.topology import Topology, split_link


def _topology():
    return Topology.from_dict({"regions": {"names": ["eu", "us"], "latency_ms": [[1, 60], [60, 1]],
                                           "bandwidth_gbps": [[10, 0.05], [0.05, 10]]},
                               "nodes": [{"name": "n0", "region": "eu"}, {"name": "n1", "region": "us"},
                                         {"name": "n2", "region": "eu"}]})


def _cost():
    spec = ModelSpec(dim=64, n_layers=4, n_heads=4, ffn_dim=256, vocab_size=256, seq_len=64)
    return CostModel(_topology(), spec, num_stages=2, samples=4, fwd_s_per_sample_layer=0.001)


def test_estimates_take_the_fastest_valid_sample():
    nbytes = 1_000_000
    samples = [LinkSample("n1", 0.060, 0.060 + nbytes / 6.25e6, nbytes),  # 60 ms, 0.05 Gbit/s
               LinkSample("n1", 0.300, 0.300 + 2 * nbytes / 6.25e6, nbytes),  # queued behind another message
               LinkSample("n1", None, 5.0, nbytes),  # receiver busy: no latency, no bandwidth
               LinkSample("n2", 0.001, None, nbytes)]  # header only: no bandwidth
    est = link_estimates(samples)
    assert set(est) == {"n1"}
    assert est["n1"]["latency_s"] == pytest.approx(0.060)
    assert est["n1"]["bytes_per_s"] == pytest.approx(6.25e6)
    assert est["n1"]["n"] == 2


def test_both_directions_are_one_link():
    reports = {"n0": NodeReport(links={"n1": {"latency_s": 0.07, "bytes_per_s": 5e6}}),
               "n1": NodeReport(links={"n0": {"latency_s": 0.06, "bytes_per_s": 6e6}})}
    assert step_links(reports) == {("n0", "n1"): (0.06, 6e6)}


def _report(lat, bw):
    return {"n1": NodeReport(links={"n0": {"latency_s": lat, "bytes_per_s": bw}})}


def test_watch_folds_small_changes_and_confirms_large_ones():
    cost, watch = _cost(), LinkWatch(threshold=2.0, probe_after=3)
    topo = cost.link("n0", "n1")
    assert watch.observe(cost, _report(0.061, 6.0e6)) == []  # close to the topology: folded
    assert cost.link("n0", "n1") == pytest.approx((0.061, 6.0e6))
    assert watch.observe(cost, _report(0.061, 6.0e6), warm=False) == []  # cold step: ignored
    slow = (topo[0] * 10, topo[1] / 10)
    for _ in range(CONFIRM_STEPS - 1):  # one step off could be an outlier: held back, not folded
        assert watch.observe(cost, _report(*slow)) == []
        assert cost.link("n0", "n1") == pytest.approx((0.061, 6.0e6))
    reasons = watch.observe(cost, _report(*slow))
    assert len(reasons) == 1 and "link n0-n1 measured 704.9 ms per activation" in reasons[0]
    assert cost.link("n0", "n1") == pytest.approx(slow)  # taken as it is, not averaged with the old level
    assert ("n0", "n1") in watch.slow
    metrics = watch.metrics(cost)
    assert metrics["link/n0-n1/latency_ms"] == pytest.approx(600.0)
    assert metrics["link/n0-n1/gbps"] == pytest.approx(0.005)


def test_outlier_for_one_step_is_not_a_change():
    cost, watch = _cost(), LinkWatch(threshold=2.0, probe_after=3)
    watch.observe(cost, _report(0.06, 6.25e6))
    watch.observe(cost, _report(0.9, 1e5))  # one bad step
    assert watch.observe(cost, _report(0.06, 6.25e6)) == []
    assert watch.observe(cost, _report(0.9, 1e5)) == []  # the streak restarted
    assert watch.slow == {}


def test_tiny_changes_below_half_a_forward_never_replan():
    """Sub-millisecond links measured on a real box differ from the topology by large ratios but
    by too little time to matter: no re-plan."""
    cost, watch = _cost(), LinkWatch(threshold=2.0, probe_after=3)
    plan = Plan("full", num_stages=2, stages_visited=2, allocation=[["n0"], ["n2"]], microbatches=[])
    for _ in range(4):
        assert watch.observe(cost, {"n2": NodeReport(links={"n0": {"latency_s": 1e-5, "bytes_per_s": 1e9}})}, plan) == []
    assert cost.link("n0", "n2")[0] < 1e-3  # but folded in


def test_idle_slow_link_is_probed_every_probe_after_steps():
    cost, watch = _cost(), LinkWatch(threshold=2.0, probe_after=3)
    topo = cost.link("n0", "n1")
    slow = (topo[0] * 10, topo[1] / 10)
    for _ in range(CONFIRM_STEPS):
        watch.observe(cost, _report(*slow))
    for _ in range(2):
        assert watch.observe(cost, {}) == []  # the plan stopped using it: idle
    reasons = watch.observe(cost, {})
    assert len(reasons) == 1 and "probing link n0-n1" in reasons[0]
    assert cost.link("n0", "n1") == topo  # costed as the topology says
    assert watch.probing == {("n0", "n1")}  # and the next plans must cross it (schedule.probe)
    assert watch.observe(cost, {}) == [] and watch.probing == {("n0", "n1")}  # not measured yet: still asked for
    still = watch.observe(cost, _report(*slow))  # the probe found it slow: one step decides
    assert "link n0-n1 measured" in still[0] and ("n0", "n1") in watch.slow and not watch.probing
    for _ in range(2):
        watch.observe(cost, {})
    assert "probing" in watch.observe(cost, {})[0]  # the same wait again, not doubled
    assert watch.observe(cost, _report(*topo)) == []  # recovered: used, folded, no longer slow
    assert watch.slow == {} and watch.probes == 2


def test_slow_link_keys_and_schedule():
    names = ["n0", "n1", "eu-a", "eu-b"]
    assert split_link("n0-n1", names) == ("n0", "n1")
    assert split_link("eu-a-eu-b", names) == ("eu-a", "eu-b")
    assert split_link("n0-n9", names) is None and split_link("n0-n0", names) is None

    class Fault:
        slow_links = {"n0-n1": 10.0}
        slow_links_from, slow_links_until = 3, 5

    assert slow_links_at(Fault, 2, names)("n0", "n1") == 1.0
    assert slow_links_at(Fault, 3, names)("n1", "n0") == 10.0  # both directions
    assert slow_links_at(Fault, 3, names)("n0", "eu-a") == 1.0
    assert slow_links_at(Fault, 5, names)("n0", "n1") == 1.0


def test_a_probe_routes_a_microbatch_over_the_link_the_router_avoids(tmp_path):
    """One region, replicas everywhere: the router has equal alternatives and leaves links idle. A
    probe (LiveState.probe_links) gets traffic on each such link by changing one microbatch's path,
    within the path rules."""
    from skippipe.config import load_config
    from skippipe.model.presets import resolve_model_spec
    from skippipe.plan import PathRules, check_plan
    from skippipe.planner import Planner
    from skippipe.runtime.links import links_used
    from skippipe.schedule import LiveState, route
    from skippipe.schedule.probe import crosses

    topology = tmp_path / "one_region.yaml"
    topology.write_text("regions: {names: [r], latency_ms: [[20]], bandwidth_gbps: [[1]]}\n"
                        "nodes: [" + ", ".join(f"{{name: n{i}, region: r}}" for i in range(8)) + "]\n")
    cfg = load_config("configs/tiny.yaml", [f"topology.file={topology}", "schedule.partition_sizes=[2,2,2,2]"])
    planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
    plan = planner.plan(0)
    stage_of = plan.stage_of()
    idle = [(a, b) for a in stage_of for b in stage_of
            if a < b and stage_of[a] != stage_of[b] and not crosses(plan, a, b)]
    assert idle, "the router used every link between stages: nothing to probe"
    rules = PathRules.from_config(cfg.schedule)
    for link in idle:
        state = LiveState(microbatches=planner.state.microbatches, probe_links={link})
        probed = route(planner.allocation, planner.topology, planner.cost, cfg, state=state)
        assert crosses(probed, *link), link
        check_plan(probed, rules)
        assert probed.extra["probe_links"] == [f"{link[0]}-{link[1]}"]
        changed = [m for m, p in zip(plan.microbatches, probed.microbatches) if m.path != p.path]
        assert len(changed) == 1  # one microbatch moved, the others keep their paths
        assert sum(links_used(probed).values()) == sum(links_used(plan).values())
    a, b = idle[0]
    state = LiveState(microbatches=planner.state.microbatches, dead={b}, probe_links={(a, b)})
    kept = route(planner.allocation, planner.topology, planner.cost, cfg, state=state)  # a dead end: no probe
    assert not crosses(kept, a, b) and "probe_links" not in kept.extra


def test_a_node_on_probation_gets_a_microbatch(tmp_path):
    """A node the router avoids (8x slower) gets one microbatch when probed (LiveState.probe_nodes),
    within the path rules; a stage-0 node is never forced (its share of microbatches is its work)."""
    from skippipe.config import load_config
    from skippipe.model.presets import resolve_model_spec
    from skippipe.plan import PathRules, check_plan
    from skippipe.planner import Planner
    from skippipe.schedule import LiveState, route

    cfg = load_config("configs/tiny.yaml", ["topology.file=null", "topology.generate.count=8",
                                            "topology.generate.placement=single", "schedule.partition_sizes=[2,2,2,2]"])
    planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
    slow = planner.allocation[2][0]
    state = LiveState(microbatches=planner.state.microbatches, slowdown={slow: 8.0})
    avoided = route(planner.allocation, planner.topology, planner.cost, cfg, state=state)
    assert not any(slow in mb.path for mb in avoided.microbatches)
    state.probe_nodes = {slow}
    probed = route(planner.allocation, planner.topology, planner.cost, cfg, state=state)
    assert sum(slow in mb.path for mb in probed.microbatches) == 1 and probed.extra["probe_nodes"] == [slow]
    check_plan(probed, PathRules.from_config(cfg.schedule))
    state.probe_nodes = {planner.allocation[0][0]}
    assert "probe_nodes" not in route(planner.allocation, planner.topology, planner.cost, cfg, state=state).extra


def test_an_emulated_message_taken_late_keeps_the_links_times():
    """A receiver busy past the emulated delivery takes the message without waiting: both parts
    are still timed by the emulated link (the payload was timed by its real arrival, before the
    emulated header: an infinite bandwidth)."""
    import time

    import torch

    from skippipe.runtime.transport import LinkModel, Transport

    nbytes = 1_000_000
    links = LinkModel(lambda a, b: 0.060, lambda a, b: 6.25e6)  # 60 ms, 0.05 Gbit/s
    transport = Transport(None, {"n0": 0, "n1": 1}, "n1", torch.device("cpu"), 5.0, links=links)
    sent = time.time() - 10.0  # delivered long ago by the emulated link: no sleep
    sample = transport._delivered("n0", sent, sent - 1.0, [sent + 1e-4, sent + 2e-4], nbytes)
    assert sample.header_s == pytest.approx(0.060)
    assert sample.payload_s == pytest.approx(0.060 + nbytes / 6.25e6)
    assert link_estimates([sample])["n0"]["bytes_per_s"] == pytest.approx(6.25e6)
