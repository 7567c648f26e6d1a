"""One node's part of one step: the plan's actions for this node, then its stage's gradient.

In the plan's per-node order: receive activations, forward, send on (or back to the originator),
loss at the originator, backward along the exact reverse path; then the stage's gradient is the
replicas' sums gathered in allocation order, divided by the iteration's microbatch count, and the
global-norm clip is summed in stage order (DESIGN.md section 6). The clipped update is held until
the coordinator commits the step (:class:`PendingUpdate`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from skippipe.plan import Plan
from skippipe.runtime.transport import ACT, GRAD, link_estimates
from skippipe.runtime.wire import NodeReport
from skippipe.train import compute
from skippipe.verify.leaves import data_leaves, gnorm_leaves, hop_leaves


@dataclass
class StepTimes:
    compute_s: Dict[str, float] = field(default_factory=lambda: {"F": 0.0, "L": 0.0, "B": 0.0})
    compute_n: Dict[str, int] = field(default_factory=lambda: {"F": 0, "L": 0, "B": 0})
    cpu_s: Dict[str, float] = field(default_factory=lambda: {"F": 0.0, "L": 0.0, "B": 0.0})
    reduce_s: float = 0.0


@dataclass
class PendingUpdate:
    """A reduced, clipped gradient waiting for the coordinator's commit of its step."""

    step: int
    grad: torch.Tensor
    scale: float
    lr: float


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class NodeStep:
    """Runs one step of ``plan`` on a worker (:class:`~skippipe.runtime.worker.Worker`: its stage,
    data, groups of the current generation and fault injector)."""

    def __init__(self, worker, plan: Plan, step: int, loss_scale: float = 1.0):
        self.w, self.plan, self.step, self.loss_scale = worker, plan, step, loss_scale
        self.times = StepTimes()
        self.leaves: Dict[str, str] = {}
        self.pending: Optional[PendingUpdate] = None
        self.transport = worker.groups.transport
        stage = worker.stage
        self.acc = compute.GradAccumulator(stage, plan.visits_of(worker.me)) if stage is not None else None
        self.act_shape = (worker.cfg.train.samples_per_microbatch, worker.spec.seq_len, worker.spec.dim)
        self.mode = worker.mode
        self.dtype = self.mode.wire_dtype  # what activations and their gradients travel in
        self.saved: Dict[int, compute.Saved] = {}  # microbatch -> what its backward needs
        self.targets: Dict[int, torch.Tensor] = {}  # microbatch -> its targets, until its loss (originator)

    def run(self, lr: float) -> NodeReport:
        """The step; its report for the coordinator (``pending``: the update to commit)."""
        w, transport = self.w, self.transport
        start = time.perf_counter()
        transport.start_step()
        transport.expect(self._receives())
        sent = transport.bytes_sent, transport.messages_sent
        hook = w.faults.op_hook(w.stage, self.step)
        try:
            losses = self._run_actions()
        finally:
            if hook is not None:
                hook.remove()
        transport.check_received()  # deferred header checks (GPU): a bad message fails the step here
        t0 = time.perf_counter()
        grad_norm = self._reduce(lr)
        self.times.reduce_s = time.perf_counter() - t0
        transport.flush()
        times = self.times
        return NodeReport(
            ok=True, node=w.me, stage=w.stage_id, losses={str(k): v for k, v in losses.items()}, grad_norm=grad_norm,
            leaves=self.leaves, compute_s=times.compute_s, compute_n=times.compute_n, compute_cpu_s=times.cpu_s,
            reduce_s=times.reduce_s, recv_wait_s=transport.recv_wait_s, emulated_delay_s=transport.emulated_delay_s,
            links=link_estimates(transport.link_samples), step_s=time.perf_counter() - start,
            sent_bytes=transport.bytes_sent - sent[0], sent_messages=transport.messages_sent - sent[1],
            peak_rss_mb=peak_rss_mb(), base_rss_mb=w.base_rss_mb)

    def _timed(self, phase: str, fn, *args):
        """Run one compute phase; record wall time (what the pipeline waits for) and, on CPU, this
        thread's CPU time (what the node's speed is: immune to other processes sharing the cores)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        result = fn(*args)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        slowdown = self.w.faults.slowdown
        if slowdown != 1.0:  # fault.slow_nodes: emulate a slower device
            # the work takes `slowdown` times as long: on a CPU its own cost is this thread's CPU time
            # (the wall time also holds the waits for other processes on shared cores, which a slower
            # device would not multiply); on an accelerator the wall time is the work
            work = cpu if self.w.device.type == "cpu" else elapsed
            time.sleep(work * (slowdown - 1.0))
            elapsed += work * (slowdown - 1.0)
            cpu *= slowdown
        self.times.compute_s[phase] += elapsed
        self.times.cpu_s[phase] += cpu if self.w.device.type == "cpu" else elapsed
        self.times.compute_n[phase] += 1
        return result

    def _actions(self):
        """This node's actions of the step in plan order: ``(microbatch, phase, path, index, after)``
        (``path``: the originator, then the route's nodes; ``after``: whom this node sends on to)."""
        routes = {mb.id: mb for mb in self.plan.microbatches}
        for mb_id, phase in self.plan.node_order.get(self.w.me, []):
            nodes = [routes[mb_id].originator, *routes[mb_id].path]
            i = nodes.index(self.w.me)
            yield mb_id, phase, nodes, i, nodes[i + 1] if i + 1 < len(nodes) else nodes[0]

    def _receives(self) -> List[tuple]:
        """This node's receives of the step in the order :meth:`_run_actions` makes them."""
        out = []
        for mb_id, phase, nodes, i, after in self._actions():
            src, kind = {"F": (nodes[i - 1], ACT), "L": (nodes[-1], ACT), "B": (after, GRAD)}[phase]
            if phase != "F" or i > 0:
                out.append((src, self.step, mb_id, kind, self.act_shape, self.dtype))
        return out

    def _run_actions(self) -> Dict[int, float]:
        losses: Dict[int, float] = {}
        for mb_id, phase, nodes, i, after in self._actions():
            if phase == "F":
                self._forward(mb_id, nodes, i, after)
            elif phase == "L":
                losses[mb_id] = self._loss(mb_id, nodes)
            else:
                self._backward(mb_id, nodes, i, after)
        return losses

    def _forward(self, mb_id: int, nodes, i: int, after: str) -> None:
        w, step = self.w, self.step
        if i == 0:
            mb = w.data.microbatch(w.cfg.run.seed, step, mb_id, w.cfg.train.samples_per_microbatch, w.spec.seq_len)
            x, self.targets[mb_id] = mb.inputs.to(w.device), mb.targets.to(w.device)
            if w.level != "off":
                self.leaves.update(data_leaves(mb))
        else:
            x = self.transport.recv(nodes[i - 1], step, mb_id, ACT, self.act_shape, self.dtype)
        out, self.saved[mb_id] = self._timed("F", compute.forward, w.stage, x, self.mode)
        if w.faults.corrupting(step, "act"):
            out = w.faults.corrupt_activation(out)
        if w.level == "full":
            self.leaves.update(hop_leaves("act", mb_id, i, w.stage_id, out))
        self.transport.send(out, after, step, mb_id, ACT)

    def _loss(self, mb_id: int, nodes) -> float:
        w, step = self.w, self.step
        hidden = self.transport.recv(nodes[-1], step, mb_id, ACT, self.act_shape, self.dtype)
        loss, grad, head_grads = self._timed("L", compute.loss_and_head_grads, w.stage, hidden,
                                             self.targets.pop(mb_id), self.mode, self.loss_scale)
        self.acc.add(mb_id, compute.head_params(w.stage), head_grads)
        if w.level == "full":
            self.leaves.update(hop_leaves("grad", mb_id, len(nodes) - 1, 0, grad))
        self.transport.send(grad, nodes[-1], step, mb_id, GRAD)
        return float(loss)

    def _backward(self, mb_id: int, nodes, i: int, after: str) -> None:
        w, step = self.w, self.step
        grad = self.transport.recv(after, step, mb_id, GRAD, self.act_shape, self.dtype)
        grad_in, body_grads = self._timed("B", compute.backward, w.stage, self.saved.pop(mb_id), grad)
        self.acc.add(mb_id, compute.body_params(w.stage), body_grads)
        self.acc.complete(mb_id)
        if i > 0:
            if w.level == "full":
                self.leaves.update(hop_leaves("grad", mb_id, i - 1, w.stage_id, grad_in))
            self.transport.send(grad_in, nodes[i - 1], step, mb_id, GRAD)

    def _reduce(self, lr: float) -> float:
        """Stage gradient = replica sums in allocation order / M; global norm summed in stage order.
        The clipped update is held until the coordinator commits this step."""
        w, groups = self.w, self.w.groups
        grad = None
        if w.stage is not None:
            mine = self.acc.result()
            if w.faults.corrupting(self.step, "grad"):
                mine = mine.clone()
                mine[0] += 1e-3
            if groups.stage_group is None:
                totals = [mine]
            else:  # gathered in allocation order of the live replicas
                totals = [torch.empty_like(mine) for _ in groups.stage_members]
                groups.collective(groups.stage_group.allgather([totals], [mine]))
                self.transport.emulate_allreduce(groups.stage_members, mine.numel() * mine.element_size())
            grad = compute.reduce_replicas(totals, len(self.plan.microbatches), self.loss_scale)
        per_stage = self._stage_sq_norms(grad)
        norm, scale = compute.clip_coefficient([per_stage[k] for k in sorted(per_stage)], w.cfg.train.grad_clip)
        if w.level != "off":
            self.leaves.update(gnorm_leaves(per_stage))
        if grad is not None:
            self.pending = PendingUpdate(self.step, grad, scale, lr)
        return norm

    def _stage_sq_norms(self, grad: Optional[torch.Tensor]) -> Dict[int, torch.Tensor]:
        """One squared gradient norm per stage (replicas agree), gathered from every member."""
        w, groups = self.w, self.w.groups
        entry = torch.zeros(2, dtype=torch.float64, device=w.device)
        entry[0] = -1.0 if w.stage_id is None else float(w.stage_id)
        if grad is not None:
            entry[1] = compute.grad_sq_norm(grad).to(w.device)
        entries = [torch.empty_like(entry) for _ in groups.members]
        groups.collective(groups.world_pg.allgather([entries], [entry]))
        per_stage = {}
        for e in entries:
            stage_id = int(e[0])
            if stage_id >= 0 and stage_id not in per_stage:
                per_stage[stage_id] = e[1].cpu()
        return per_stage
