import pytest

from skippipe.errors import PlanError
from skippipe.plan import MicrobatchRoute, Plan
from skippipe.simulate import simulate


class FlatCost:
    """Forward 1 s, backward 2 s, loss 0.5 s, every transfer 0.25 s, all-reduce 3 s."""

    def compute_s(self, node, stage, phase):
        return {"F": 1.0, "B": 2.0, "L": 0.5}[phase]

    def transfer_s(self, a, b, nbytes=None):
        return 0.0 if a == b else 0.25

    def allreduce_s(self, stage, nodes):
        return 3.0 if len(nodes) > 1 else 0.0


def _plan(allocation, routes, order=None):
    mbs = [MicrobatchRoute(i, o, p, s) for i, (o, p, s) in enumerate(routes)]
    plan = Plan("handmade", len(allocation), 1 + len(routes[0][1]), allocation, mbs)
    plan.node_order = order or {}
    return plan


def test_single_microbatch_two_nodes():
    # F a [0,1], ->0.25, F b [1.25,2.25], ->0.25, L a [2.5,3], ->0.25, B b [3.25,5.25], ->0.25, B a [5.5,7.5]
    tl = simulate(_plan([["a"], ["b"]], [("a", ["b"], 0.0)]), FlatCost())
    assert tl.makespan_s == pytest.approx(7.5)
    assert tl.collisions == 0
    assert tl.busy_s == {"a": pytest.approx(3.5), "b": pytest.approx(3.0)}
    assert tl.idle_s["b"] == pytest.approx(4.5)
    assert tl.order() == {"a": [(0, "F"), (0, "L"), (0, "B")], "b": [(0, "F"), (0, "B")]}


def test_collision_two_originators_share_a_node():
    # a and c both send to b at 1.25; mb 0 first (tie by id), mb 1 waits 1 s at b.
    # mb1: F b [2.25,3.25], L c [3.5,4], B b: ready 4.25 but b runs mb0's B [3.25,5.25] -> [5.25,7.25]
    # -> B c [7.5,9.5]
    plan = _plan([["a", "c"], ["b"]], [("a", ["b"], 0.0), ("c", ["b"], 0.0)])
    tl = simulate(plan, FlatCost())
    assert tl.compute_end_s == pytest.approx(9.5)
    assert tl.makespan_s == pytest.approx(12.5)  # + stage-0 all-reduce of a and c
    assert tl.collisions == 2
    assert [(c["node"], c["microbatch"], c["phase"]) for c in tl.collision_list] == [("b", 1, "F"), ("b", 1, "B")]


def test_memory_one_slot_serialises_forwards():
    # memory 1 on a: mb1's forward on a waits for mb0's backward on a (ends 7.5); then 7.5 more.
    plan = _plan([["a"], ["b"]], [("a", ["b"], 0.0), ("a", ["b"], 0.0)])
    assert simulate(plan, FlatCost(), memory=1).makespan_s == pytest.approx(15.0)
    assert simulate(plan, FlatCost(), memory=2).makespan_s < 15.0


def test_three_nodes_with_allreduce():
    # two stage-1 replicas b, d; both microbatches run in parallel from a and c: 7.5 s each, then the
    # stage-0 replicas (a, c) all-reduce for 3 s, stage 1 ends at 5.25 and all-reduces to 8.25
    plan = _plan([["a", "c"], ["b", "d"]], [("a", ["b"], 0.0), ("c", ["d"], 0.0)])
    tl = simulate(plan, FlatCost())
    assert tl.compute_end_s == pytest.approx(7.5)
    assert tl.makespan_s == pytest.approx(10.5)
    assert tl.allreduce == [(0, pytest.approx(7.5), pytest.approx(10.5)), (1, pytest.approx(5.25), pytest.approx(8.25))]


def test_node_order_is_followed_and_deadlock_detected():
    plan = _plan([["a", "c"], ["b"]], [("a", ["b"], 0.0), ("c", ["b"], 0.0)])
    plan.node_order = {"a": [(0, "F"), (0, "L"), (0, "B")], "c": [(1, "F"), (1, "L"), (1, "B")],
                       "b": [(1, "F"), (0, "F"), (1, "B"), (0, "B")]}
    tl = simulate(plan, FlatCost())
    assert [e[1] for e in tl.events if e[0] == "b" and e[2] == "F"] == [1, 0]
    assert tl.compute_end_s == pytest.approx(9.5)
    # memory 1 at b with an order that needs both forwards before a backward cannot finish
    with pytest.raises(PlanError, match="deadlock"):
        simulate(plan, FlatCost(), memory=1)


def test_start_time_delays_release():
    tl = simulate(_plan([["a"], ["b"]], [("a", ["b"], 2.0)]), FlatCost())
    assert tl.makespan_s == pytest.approx(9.5)
    assert tl.summary()["makespan_s"] == pytest.approx(9.5)
