"""Cost model shared by the scheduler, the simulator and the runtime (DESIGN.md section 3).

Per microbatch on node n holding stage k: forward ``f = layers_k * samples * fwd_s_per_sample_layer
/ speed_n`` when ``cost.fwd_s_per_sample_layer`` is set (the SkipPipe reference's 0.055 s), else
``layers_k * samples * seq * flops_per_token_layer / (flops_per_s * speed_n)``; backward
``bwd_factor * f``, plus the recomputed blocks' forward with activation checkpointing; loss and
head at the originator ``loss_factor * f(stage 0)``. Transfer a -> b:
``latency + bytes / bandwidth + message_overhead_s`` (0 on the same node). Gradient reduction of a
stage: a ring all-reduce over its slowest link. Measured values are folded in with an EWMA and
replace the modelled ones (``observe_compute``; ``observe_link_estimate``: a link's measured
latency and bandwidth, from the transport's timings).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from skippipe.model.presets import ModelSpec, checkpoint_interval
from skippipe.model.transformer import split_layers as stage_layer_ids
from skippipe.topology import Topology

PHASE_NAMES = ("F", "L", "B")
PARAM_BYTES = 4  # master weights, gradients and AdamW moments stay fp32 in every precision
ACTS_PER_LAYER = 16  # activations a block keeps for its backward, in hidden-size tensors (rough)


def split_layers(n_layers: int, num_stages: int) -> List[int]:
    """Layers per stage, as even as possible, extras to the lowest stages: the sizes of the stages
    :func:`skippipe.model.transformer.split_layers` builds (the one definition of the split)."""
    return [len(ids) for ids in stage_layer_ids(n_layers, num_stages)]


class CostModel:
    """Compute and transfer times in seconds; see the module docstring for the formulas."""

    def __init__(self, topology: Topology, spec: ModelSpec, num_stages: int, samples: int, *,
                 fwd_s_per_sample_layer=None, flops_per_s: float = 5e10, bwd_factor: float = 1.5,
                 loss_factor: float = 0.25, message_overhead_s: float = 0.0, bytes_per_element: int = 4,
                 measured_ewma: float = 0.3, grad_sync: bool = True, checkpoint_every: int = 0):
        self.topology = topology
        self.spec = spec
        self.num_stages = num_stages
        self.samples = samples
        self.fwd_s_per_sample_layer = fwd_s_per_sample_layer
        self.flops_per_s = flops_per_s
        self.bwd_factor = bwd_factor
        self.loss_factor = loss_factor
        self.message_overhead_s = message_overhead_s
        self.bytes_per_element = bytes_per_element
        self.measured_ewma = measured_ewma
        self.grad_sync = grad_sync
        self.layers_per_stage = split_layers(spec.n_layers, num_stages)
        self.checkpoint_every = checkpoint_every  # train.activation_checkpointing: 0 none, k every k-th block
        self.activation_bytes = samples * spec.seq_len * spec.dim * bytes_per_element
        self._measured_compute: Dict[Tuple[str, int, str], float] = {}
        self._node_ratio: Dict[str, float] = {}
        # measured over modelled time of the median measured node: a node not measured yet (one that
        # just joined) is assumed typical, not as fast or slow as the uncalibrated model says
        self._typical_ratio = 1.0
        # (a, b) with a <= b -> [latency_s, bytes_per_s] as measured (EWMA), in place of the topology's
        self._measured_link: Dict[Tuple[str, str], List[float]] = {}

    @classmethod
    def from_config(cls, cfg, spec: ModelSpec, topology: Topology) -> "CostModel":
        from skippipe.plan import num_stages

        c, train = cfg.cost, cfg.train
        element = c.bytes_per_element or (4 if train.precision == "fp32" else 2)
        return cls(topology, spec, num_stages(cfg.schedule), train.samples_per_microbatch,
                   fwd_s_per_sample_layer=c.fwd_s_per_sample_layer, flops_per_s=c.flops_per_s,
                   bwd_factor=c.bwd_factor, loss_factor=c.loss_factor, message_overhead_s=c.message_overhead_s,
                   bytes_per_element=element, measured_ewma=c.measured_ewma,
                   grad_sync=getattr(c, "grad_sync", True),
                   checkpoint_every=checkpoint_interval(train.activation_checkpointing))

    # -- compute --------------------------------------------------------------------------------
    def modelled_fwd_s(self, node: str, stage: int) -> float:
        layers = self.layers_per_stage[stage]
        speed = self.topology.node(node).speed
        if self.fwd_s_per_sample_layer is not None:
            return self.fwd_s_per_sample_layer * layers * self.samples / speed
        flops = layers * self.samples * self.spec.seq_len * self.spec.flops_per_token_layer()
        return flops / (self.flops_per_s * speed)

    def modelled_s(self, node: str, stage: int, phase: str) -> float:
        """One microbatch's ``phase`` (F, B, L) of ``stage`` on ``node`` as the topology's speeds
        alone give it (no measurement folded in: what a node's measured time is compared with)."""
        if phase == "F":
            return self.modelled_fwd_s(node, stage)
        if phase == "B":
            fwd = self.modelled_fwd_s(node, stage)
            return self.bwd_factor * fwd + fwd * self.recomputed_fraction(stage)
        return self.loss_factor * self.modelled_fwd_s(node, 0)

    def recomputed_fraction(self, stage: int) -> float:
        """Share of the stage's blocks whose forward runs again in the backward (blocks 0, k, 2k, ...)."""
        layers = self.layers_per_stage[stage]
        if not self.checkpoint_every or not layers:
            return 0.0
        return -(-layers // self.checkpoint_every) / layers

    def _time(self, node: str, stage: int, phase: str) -> float:
        measured = self._measured_compute.get((node, stage, phase))
        if measured is not None:
            return measured
        return self.modelled_s(node, stage, phase) * self._node_ratio.get(node, self._typical_ratio)

    def fwd_s(self, node: str, stage: int) -> float:
        return self._time(node, stage, "F")

    def bwd_s(self, node: str, stage: int) -> float:
        return self._time(node, stage, "B")

    def loss_s(self, node: str) -> float:
        """Final norm, LM head and loss at the originator (stage 0)."""
        return self._time(node, 0, "L")

    def compute_s(self, node: str, stage: int, phase: str) -> float:
        return self._time(node, stage, phase)

    # -- communication --------------------------------------------------------------------------
    def transfer_s(self, a: str, b: str, nbytes=None) -> float:
        if a == b:
            return 0.0
        nbytes = self.activation_bytes if nbytes is None else nbytes
        latency, bandwidth = self.link(a, b)
        return latency + nbytes / bandwidth + self.message_overhead_s

    def link(self, a: str, b: str) -> Tuple[float, float]:
        """``(latency_s, bytes_per_s)`` of the link: measured if it was, else the topology's."""
        measured = self._measured_link.get(_link(a, b))
        if measured is not None:
            return measured[0], measured[1]
        return self.topology.latency_s(a, b), self.topology.bandwidth_bytes_per_s(a, b)

    def transfer_matrix_s(self, names: Sequence[str] = None, nbytes=None) -> np.ndarray:
        """Activation transfer times between all pairs of ``names`` (node x node), vectorised."""
        nbytes = self.activation_bytes if nbytes is None else nbytes
        topo = self.topology
        if names is None or list(names) == topo.names():
            lat, bw = topo.latency_matrix_s(), topo.bandwidth_matrix_bytes_per_s()
        else:
            idx = np.array([topo.index(n) for n in names])
            lat = topo.latency_matrix_s()[np.ix_(idx, idx)]
            bw = topo.bandwidth_matrix_bytes_per_s()[np.ix_(idx, idx)]
        matrix = lat + nbytes / bw + self.message_overhead_s
        np.fill_diagonal(matrix, 0.0)
        return matrix

    def transfer_table_s(self, names: Sequence[str]) -> np.ndarray:
        """``transfer_s(a, b)`` for every pair of ``names`` (measured links folded in), vectorised."""
        matrix = self.transfer_matrix_s(names)
        if self._measured_link:
            index = {n: i for i, n in enumerate(names)}
            for a, b in self._measured_link:
                if a in index and b in index:
                    i, j = index[a], index[b]
                    matrix[i, j] = matrix[j, i] = self.transfer_s(a, b)
        return matrix

    def stage_param_bytes(self, stage: int) -> int:
        params = self.layers_per_stage[stage] * self.spec.layer_params()
        if stage == 0:
            params += 2 * self.spec.vocab_size * self.spec.dim + self.spec.dim
        return params * PARAM_BYTES

    def microbatch_memory_bytes(self, stage: int) -> float:
        """Activations one microbatch in flight keeps on a node of ``stage`` until its backward:
        about ``ACTS_PER_LAYER`` hidden-size tensors per block (a rough, documented estimate), one
        (the block's input) per checkpointed block."""
        layers = max(1, self.layers_per_stage[stage])
        checkpointed = round(self.recomputed_fraction(stage) * layers)
        return self.activation_bytes * (ACTS_PER_LAYER * (layers - checkpointed) + checkpointed)

    def stage_memory_bytes(self, stage: int, memory: int) -> float:
        """Weights, gradients and AdamW moments (4x params) plus ``memory`` microbatches of activations
        (and, with checkpointing, one block's full activations while it is recomputed)."""
        recompute = self.activation_bytes * ACTS_PER_LAYER if self.checkpoint_every else 0.0
        return 4.0 * self.stage_param_bytes(stage) + memory * self.microbatch_memory_bytes(stage) + recompute

    def derived_memory(self, most: int) -> int:
        """TC1 microbatches in flight when ``schedule.memory`` is null: as many as every node could hold
        of the stage that needs the most memory (at least 1; more than ``most``, the microbatches of an
        iteration, would change nothing)."""
        fits = []
        for node in self.topology.nodes:
            for stage in range(self.num_stages):
                free = node.memory_gb * 2**30 - self.stage_memory_bytes(stage, 0)  # GiB, as allocate()
                fits.append(int(free // self.microbatch_memory_bytes(stage)))
        return max(1, min([most, *fits]))

    def allreduce_s(self, stage: int, nodes: Iterable[str]) -> float:
        """Ring all-reduce of the stage's gradients over its slowest link (0 for one replica)."""
        nodes = list(nodes)
        n = len(nodes)
        if n <= 1 or not self.grad_sync:
            return 0.0
        links = [self.link(a, b) for a in nodes for b in nodes if a != b]
        slowest_bw = min(bw for _, bw in links)
        worst_lat = max(lat for lat, _ in links)
        volume = 2.0 * (n - 1) / n * self.stage_param_bytes(stage)
        return volume / slowest_bw + 2 * (n - 1) * (worst_lat + self.message_overhead_s)

    # -- measurements ---------------------------------------------------------------------------
    def observe_compute(self, node: str, stage: int, phase: str, seconds: float) -> None:
        """Fold a measured compute time in (EWMA); it replaces the modelled one from now on."""
        key = (node, stage, phase)
        w = self.measured_ewma
        old = self._measured_compute.get(key)
        self._measured_compute[key] = seconds if old is None else (1 - w) * old + w * seconds
        ratio = seconds / max(self.modelled_s(node, stage, phase), 1e-12)
        prev = self._node_ratio.get(node)
        self._node_ratio[node] = ratio if prev is None else (1 - w) * prev + w * ratio
        self._typical_ratio = float(np.median(list(self._node_ratio.values())))

    def observe_link_estimate(self, a: str, b: str, latency_s: float, bytes_per_s: float,
                              reset: bool = False) -> None:
        """Fold a measured latency and bandwidth of the link a-b in (EWMA; ``reset``: replace, the
        link changed); it replaces the topology's values from now on."""
        if a == b or not bytes_per_s > 0:
            return
        key, w = _link(a, b), self.measured_ewma
        old = self._measured_link.get(key)
        if old is None or reset:
            self._measured_link[key] = [latency_s, bytes_per_s]
        else:  # average the time per byte, not the bandwidth: one slow sample must weigh as much as a fast one
            old[0] = (1 - w) * old[0] + w * latency_s
            old[1] = 1.0 / ((1 - w) / old[1] + w / bytes_per_s)

    def measured_links(self) -> Dict[Tuple[str, str], Tuple[float, float]]:
        """``(a, b) -> (latency_s, bytes_per_s)`` of the links measured so far (a <= b)."""
        return {k: (v[0], v[1]) for k, v in self._measured_link.items()}

    def forget_link(self, a: str, b: str) -> None:
        """Drop what was measured of the link: it is costed as the topology says again (a probe)."""
        self._measured_link.pop(_link(a, b), None)

    def forget(self, node: str) -> None:
        """Drop what was measured of ``node``'s compute: it is costed as a typical node again (to
        probe a node that got no work since it was found slow)."""
        self._measured_compute = {k: v for k, v in self._measured_compute.items() if k[0] != node}
        self._node_ratio.pop(node, None)
        if self._node_ratio:
            self._typical_ratio = float(np.median(list(self._node_ratio.values())))

    def slowdown(self, node: str) -> float:
        """Measured over modelled compute time of ``node`` (1.0 before any measurement)."""
        return self._node_ratio.get(node, 1.0)


def _link(a: str, b: str) -> Tuple[str, str]:
    return (a, b) if a <= b else (b, a)


class CachedCost:
    """A read-only memo of a cost model's ``compute_s``, ``transfer_s`` and ``allreduce_s``.

    The schedulers simulate thousands of candidate plans on one unchanging cost model; looking
    each time up through the topology dominates those simulations. Values are exactly the wrapped
    model's (computed by it once), so a plan scores the same on the memo as on the model. Create a
    new memo after the model changes (``observe_*``).
    """

    def __init__(self, cost):
        self.cost = cost
        self._compute: Dict[Tuple[str, int, str], float] = {}
        self._transfer: Dict[Tuple[str, str], float] = {}
        self._allreduce: Dict[Tuple[int, Tuple[str, ...]], float] = {}

    def compute_s(self, node: str, stage: int, phase: str) -> float:
        key = (node, stage, phase)
        value = self._compute.get(key)
        if value is None:
            value = self._compute[key] = self.cost.compute_s(node, stage, phase)
        return value

    def transfer_s(self, a: str, b: str, nbytes=None) -> float:
        if nbytes is not None:
            return self.cost.transfer_s(a, b, nbytes)
        key = (a, b)
        value = self._transfer.get(key)
        if value is None:
            value = self._transfer[key] = self.cost.transfer_s(a, b)
        return value

    def allreduce_s(self, stage: int, nodes: Iterable[str]) -> float:
        key = (stage, tuple(nodes))
        value = self._allreduce.get(key)
        if value is None:
            value = self._allreduce[key] = self.cost.allreduce_s(stage, list(key[1]))
        return value

    def __getattr__(self, name):
        return getattr(self.cost, name)


def resolve_memory(cfg, cost: CostModel) -> int:
    """``schedule.memory``, derived from the nodes' ``memory_gb`` when null (written into ``cfg``, so
    the run's saved config, its workers and its replay use the same number)."""
    if cfg.schedule.memory is None:
        most = len(cost.topology.nodes) * cfg.schedule.microbatches_per_originator
        cfg.schedule.memory = cost.derived_memory(most)
    return cfg.schedule.memory
