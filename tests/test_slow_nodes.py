"""Tier 1: the coordinator's slow-node rules on recorded step reports (no processes): a node is slow
after SLOW_STEPS steps above ``fault.slow_threshold`` times the median node, one noisy step is not
enough, a slow node left without work is tried again after ``fault.probe_after`` steps (probation),
found slow again it is routed around at once and waits twice as long, found fast it is used again."""

from skippipe.config import load_config
from skippipe.model.presets import resolve_model_spec
from skippipe.planner import Planner
from skippipe.runtime.executor import StepOutcome
from skippipe.runtime.faults import FaultMonitor
from skippipe.runtime.membership import Membership
from skippipe.runtime.slow_nodes import SLOW_STEPS
from skippipe.runtime.wire import NodeReport

PROBE_AFTER = 3


def setup():
    cfg = load_config("configs/tiny.yaml", [f"fault.probe_after={PROBE_AFTER}", "fault.slow_threshold=2.0"])
    planner = Planner(cfg, resolve_model_spec(cfg.model, vocab_size=256))
    plan = planner.plan(0)
    return cfg, planner, plan, FaultMonitor(cfg, Membership(planner.topology.names()))


def reports(planner, plan, factor, absent=()):
    """Each node's compute as the cost model predicts it, times ``factor[node]`` (default 1)."""
    stage_of, out = plan.stage_of(), {}
    for node, actions in plan.node_order.items():
        if node in absent:
            continue
        counts = {ph: sum(1 for _, p in actions if p == ph) for ph in ("F", "L", "B")}
        cpu = {ph: n * planner.cost.modelled_s(node, stage_of[node], ph) * factor.get(node, 1.0)
               for ph, n in counts.items()}
        out[node] = NodeReport(ok=True, compute_cpu_s=cpu, compute_n=counts)
    return StepOutcome({}, 0.0, out)


def step(monitor, planner, plan, k, factor, absent=()):
    monitor.after_step(planner, reports(planner, plan, factor, absent), plan, step=k)


def test_a_node_is_slow_only_after_several_slow_steps_and_one_noisy_step_resets_it():
    _, planner, plan, monitor = setup()
    node = plan.allocation[1][0]
    for k in range(SLOW_STEPS - 1):
        step(monitor, planner, plan, k, {node: 3.0})
        assert node not in monitor.slow
    step(monitor, planner, plan, SLOW_STEPS - 1, {node: 1.0})  # a typical step between: the streak restarts
    for k in range(SLOW_STEPS - 1):
        step(monitor, planner, plan, SLOW_STEPS + k, {node: 3.0})
    assert node not in monitor.slow and monitor.replans == 0
    step(monitor, planner, plan, 2 * SLOW_STEPS, {node: 3.0})
    assert monitor.slow[node] > 2.0 and monitor.replans == 1 and monitor.reroutes == 1
    assert monitor.metrics()[f"node/{node}/slowdown"] > 2.0


def test_probation_after_idle_steps_then_slow_again_waits_twice_as_long_or_fast_is_used_again():
    _, planner, plan, monitor = setup()
    node = plan.allocation[1][0]
    for k in range(SLOW_STEPS):
        step(monitor, planner, plan, k, {node: 3.0})
    assert node in monitor.slow
    k = SLOW_STEPS
    for _ in range(PROBE_AFTER - 1):  # routed around: no work, so no measurement
        step(monitor, planner, plan, k, {}, absent={node})
        k += 1
        assert node in monitor.slow and node not in planner.state.probe_nodes
    step(monitor, planner, plan, k, {}, absent={node})
    k += 1
    assert node not in monitor.slow and node in planner.state.probe_nodes and monitor.probes == 1
    step(monitor, planner, plan, k, {node: 3.0})  # the probe: still slow, one step is enough
    k += 1
    assert node in monitor.slow and node not in planner.state.probe_nodes
    for _ in range(2 * PROBE_AFTER - 1):  # the next try waits twice as long
        step(monitor, planner, plan, k, {}, absent={node})
        k += 1
        assert node in monitor.slow
    step(monitor, planner, plan, k, {}, absent={node})
    k += 1
    assert node not in monitor.slow and monitor.probes == 2
    step(monitor, planner, plan, k, {node: 1.0})  # recovered: measured typical, it stays in use
    assert node not in monitor.slow and node not in planner.state.probe_nodes
