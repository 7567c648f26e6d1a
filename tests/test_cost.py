import pytest

from skippipe.config import load_config
from skippipe.cost import CostModel, split_layers
from skippipe.model.presets import resolve_model_spec
from skippipe.topology import Node, Topology


def _cost(overrides=()):
    cfg = load_config(None, ["model.preset=llama-500m", "schedule.partition_sizes=[1,1,1,1,1]",
                             "cost.fwd_s_per_sample_layer=0.055", "cost.message_overhead_s=0.35", *overrides])
    topo = Topology(["a", "b"], [[1, 100], [100, 1]], [[8, 0.8], [0.8, 8]],
                    [Node("n0", "a"), Node("n1", "b"), Node("n2", "a", speed=2.0)])
    spec = resolve_model_spec(cfg.model, vocab_size=256)
    return CostModel.from_config(cfg, spec, topo)


def test_split_layers_extras_to_lowest():
    assert split_layers(24, 5) == [5, 5, 5, 5, 4]
    assert split_layers(8, 3) == [3, 3, 2]


def test_fixed_compute_times_match_reference():
    cost = _cost()
    assert cost.layers_per_stage == [5, 5, 5, 5, 4]
    assert cost.fwd_s("n0", 4) == pytest.approx(0.055 * 4 * 8)
    assert cost.bwd_s("n0", 4) == pytest.approx(1.5 * 0.055 * 4 * 8)
    assert cost.loss_s("n0") == pytest.approx(0.25 * 0.055 * 5 * 8)
    assert cost.fwd_s("n2", 4) == pytest.approx(0.055 * 4 * 8 / 2.0)


def test_transfer_time_latency_bandwidth_overhead():
    cost = _cost()
    nbytes = 8 * 1024 * 1024 * 4
    assert cost.activation_bytes == nbytes
    assert cost.transfer_s("n0", "n1") == pytest.approx(0.1 + nbytes / 0.1e9 + 0.35)
    assert cost.transfer_s("n0", "n2") == pytest.approx(0.001 + nbytes / 1e9 + 0.35)
    assert cost.transfer_s("n1", "n1") == 0.0
    assert cost.transfer_matrix_s()[0, 1] == pytest.approx(cost.transfer_s("n0", "n1"))


def test_flop_model_when_no_fixed_time():
    cost = _cost(["cost.fwd_s_per_sample_layer=null", "cost.flops_per_s=1e12"])
    spec = cost.spec
    expected = 5 * 8 * spec.seq_len * spec.flops_per_token_layer() / 1e12
    assert cost.fwd_s("n0", 0) == pytest.approx(expected)


def test_allreduce_ring_over_slowest_link():
    cost = _cost(["cost.message_overhead_s=0"])
    assert cost.allreduce_s(1, ["n0"]) == 0.0
    two = cost.allreduce_s(1, ["n0", "n1"])
    assert two == pytest.approx(cost.stage_param_bytes(1) / 0.1e9 + 2 * 0.1)
    assert cost.allreduce_s(1, ["n0", "n2"]) < two


def test_measurements_replace_model_with_ewma():
    cost = _cost()
    base = cost.fwd_s("n0", 1)
    cost.observe_compute("n0", 1, "F", 2 * base)
    assert cost.fwd_s("n0", 1) == pytest.approx(2 * base)
    assert cost.slowdown("n0") == pytest.approx(2.0)
    assert cost.bwd_s("n0", 2) == pytest.approx(2.0 * 1.5 * cost.modelled_fwd_s("n0", 2))
    cost.observe_compute("n0", 1, "F", base)
    assert cost.fwd_s("n0", 1) == pytest.approx(0.7 * 2 * base + 0.3 * base)


def test_measured_links_replace_the_topology_with_ewma_per_byte():
    cost = _cost()
    nbytes, overhead = cost.activation_bytes, cost.message_overhead_s
    cost.observe_link_estimate("n1", "n0", 0.2, 1e6)  # either direction: one link
    assert cost.transfer_s("n0", "n1") == pytest.approx(0.2 + nbytes / 1e6 + overhead)
    assert cost.transfer_table_s(["n0", "n1"])[0, 1] == pytest.approx(cost.transfer_s("n0", "n1"))
    cost.observe_link_estimate("n0", "n1", 0.1, 2e6)
    # latency averaged, time per byte averaged (0.7 / 1e6 + 0.3 / 2e6 per byte)
    assert cost.link("n0", "n1") == pytest.approx((0.7 * 0.2 + 0.3 * 0.1, 1 / (0.7 / 1e6 + 0.3 / 2e6)))
    cost.observe_link_estimate("n0", "n1", 2.0, 1e5, reset=True)  # the link changed: no averaging
    assert cost.link("n0", "n1") == pytest.approx((2.0, 1e5))
    assert set(cost.measured_links()) == {("n0", "n1")}
    cost.forget_link("n1", "n0")
    assert cost.link("n0", "n1") == (cost.topology.latency_s("n0", "n1"), cost.topology.bandwidth_bytes_per_s("n0", "n1"))


def test_unmeasured_node_is_assumed_typical():
    """A node with no measurements yet (one that just joined) is scaled like the median measured
    node, so an uncalibrated model does not make it look faster or slower than its peers."""
    cost = _cost()
    assert cost.fwd_s("n2", 1) == pytest.approx(cost.modelled_fwd_s("n2", 1))  # nothing measured: the model
    for node, factor in (("n0", 0.1), ("n1", 0.3)):
        cost.observe_compute(node, 1, "F", factor * cost.modelled_fwd_s(node, 1))
    typical = 0.2  # the median of the measured ratios 0.1 and 0.3
    assert cost.fwd_s("n2", 3) == pytest.approx(typical * cost.modelled_fwd_s("n2", 3))
    assert cost.fwd_s("n2", 3) < cost.fwd_s("n1", 3)  # n2's own speed (2.0) still counts
    assert cost.slowdown("n2") == 1.0  # reported slowdown: measured only
