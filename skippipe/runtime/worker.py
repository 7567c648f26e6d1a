"""The worker: one node holding one pipeline stage. Launcher-agnostic.

Reads the torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
MASTER_PORT is the coordinator's control store), so ``launcher=local``, torchrun and Ray actors all
run this same code. ``SKIPPIPE_NODE`` names the node (a replacement joins under the name of the node
it replaces); otherwise the node is the RANK-th of the coordinator's node list.

Each command carries a generation (the membership epoch), the step's plan and learning rate. The
worker (1) applies the update of the last step the coordinator declared complete (``commit_step``),
so no optimizer step is ever half applied across replicas, (2) rebuilds its process group when the
generation changed (copying stage state to a new replica if told), then (3) runs, in the plan's
per-node order, the actions that concern it: receive activations, forward, send on (or back to the
originator), loss at the originator, backward along the exact reverse path, and reduces its stage's
gradient with the stage's replicas in allocation order (global-norm clip summed in stage order). It
reports measured times and losses, or the error that stopped it, and waits for the next command.

Run as ``python -m skippipe.runtime.worker`` with those variables set.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from skippipe.plan import Plan
from skippipe.runtime.control import ControlChannel, connect_store
from skippipe.runtime.transport import ACT, GRAD, Aborted, LinkModel, Transport, TransportError, Waiter, link_estimates
from skippipe.train import compute
from skippipe.verify.leaves import data_leaf, gnorm_leaves, hop_leaf, load_state_tensors, state_digests, state_tensors

log = logging.getLogger("skippipe.worker")

_PEER_FAILURE_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "Connection refused", "timed out", "Timed out", "aborted")


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    node: Optional[str] = None  # SKIPPIPE_NODE
    incarnation: int = 0  # SKIPPIPE_INCARNATION: 0 for an original node, >0 for a replacement
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: >0 after torchrun restarted the group

    @classmethod
    def from_environ(cls, environ=os.environ) -> "WorkerEnv":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise RuntimeError(f"worker: environment variables {', '.join(missing)} are not set "
                               "(start workers with skippipe train, torchrun or the Ray launcher)")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                   environ["MASTER_ADDR"], int(environ["MASTER_PORT"]), environ.get("SKIPPIPE_NODE"),
                   int(environ.get("SKIPPIPE_INCARNATION", "0")), int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))

    @property
    def fresh(self) -> bool:
        """The first life of this node: injected faults apply only here, never to a replacement or
        a restarted group (they would repeat forever)."""
        return self.incarnation == 0 and self.restart == 0


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


class Worker:
    """Lifecycle: connect -> (per generation) setup -> step ... -> save -> close."""

    def __init__(self, env: WorkerEnv, control: ControlChannel):
        self.env = env
        self.control = control
        message = control.wait_for("config")
        from skippipe.config import from_dict

        self.cfg = from_dict(message["config"])
        self.nodes: List[str] = message["nodes"]
        self.vocab_size: int = message["vocab_size"]
        self.me = env.node or self.nodes[env.rank]
        self.device = self._device()
        self.stage = None
        self.stage_id: Optional[int] = None
        self.generation = -1
        self.command_index = 0
        self.world_pg = self.stage_group = self.transport = None
        self._retired: List[Any] = []  # process groups of earlier generations (see close)
        self.waiter = Waiter()
        self.pending: Optional[PendingUpdate] = None
        self.slowdown = float(self.cfg.fault.slow_nodes.get(self.me, 1.0))
        self.level = self.cfg.verify.level
        self.state_report: Optional[Dict[str, Any]] = None  # digests after the last committed update
        corrupt = self.cfg.fault.corrupt
        self.corrupt_step = corrupt.step if corrupt.node == self.me and env.fresh else None

    def _device(self) -> torch.device:
        name = self.cfg.train.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            torch.cuda.set_device(self.env.local_rank)
            return torch.device("cuda", self.env.local_rank)
        return torch.device(name)

    # -- membership -----------------------------------------------------------------------------
    def setup(self, command: Dict[str, Any], plan: Plan) -> None:
        """Join generation ``command['generation']``: build the stage if new, form the process
        group of the live members, and copy stage state to new replicas if the command says so."""
        from skippipe.model.presets import resolve_model_spec
        from skippipe.model.transformer import build_stages
        from skippipe.train.optim import make_optimizer

        self.close()
        cfg = self.cfg
        self.spec = resolve_model_spec(cfg.model, vocab_size=self.vocab_size)
        self.stage_id = plan.stage_of().get(self.me)
        if self.stage_id is not None and (self.stage is None or self.stage.stage_id != self.stage_id):
            self.stage = build_stages(self.spec, plan.num_stages, cfg.run.seed, only=[self.stage_id])[self.stage_id]
            self.stage.to(self.device)
            self.optimizer = make_optimizer(self.stage, cfg.train)
        if self.stage_id == 0 and not hasattr(self, "data"):
            from skippipe.data import load_data

            self.data = load_data(cfg.data)
        members: List[str] = command["members"]
        self._init_groups(plan, members, command["generation"], command.get("added") or [])
        for stage, source in sorted((command.get("sync") or {}).items()):
            self._sync_stage(int(stage), source)
        for stage, sources in sorted((command.get("rebuild") or {}).items()):
            self._rebuild_stage(int(stage), sources, plan)
        restore = (command.get("restore") or {}).get(str(self.stage_id))
        if restore:  # this stage lost every replica: load it from a verified checkpoint
            self.load_checkpoint(restore)

    def _init_groups(self, plan: Plan, members: List[str], generation: int, added: List[Dict[str, Any]]) -> None:
        """Process-group objects of this generation (the world, and one per stage with replicas).

        They are explicit objects on store prefixes ``pg/<generation>/...``, not torch's global
        default group, so the survivors of a failure form new ones without tearing down a group that
        a stuck receive may still be using (see :class:`~skippipe.runtime.transport.Waiter`)."""
        backend = self.cfg.runtime.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.cfg.runtime.timeout_s)
        self.members = members
        self.rank_of = {name: rank for rank, name in enumerate(members)}
        prefix = f"pg/{generation}"
        self.world_pg = _make_group(backend, dist.PrefixStore(f"{prefix}/world", self.control.raw),
                                    self.rank_of[self.me], len(members), timeout)
        # stage group: the stage's live replicas in allocation order (gather index = that order)
        self.stage_group = None
        if self.stage_id is not None:
            self.stage_members = [n for n in plan.allocation[self.stage_id] if n in self.rank_of]
            if len(self.stage_members) > 1:
                store = dist.PrefixStore(f"{prefix}/stage{self.stage_id}", self.control.raw)
                self.stage_group = _make_group(backend, store, self.stage_members.index(self.me),
                                               len(self.stage_members), timeout)
        links = None
        if self.cfg.cost.emulate_links:
            from skippipe.topology import Node, load_topology

            topo = load_topology(self.cfg)
            for a in added:  # nodes added to the running job (skippipe join)
                topo = topo.with_node(Node(a["name"], a["region"], a["speed"], a["memory_gb"]))
            links = LinkModel(topo.latency_s, topo.bandwidth_bytes_per_s)
            self._link_names = topo.names()
        self.transport = Transport(self.world_pg, self.rank_of, self.me, self.device, self.cfg.runtime.timeout_s,
                                   links, should_abort=self._aborted, waiter=self.waiter)
        self.generation = generation

    def _aborted(self) -> bool:
        """Has the coordinator abandoned the command being executed?"""
        return self.control.has(f"abort/{self.command_index}")

    def _collective(self, work) -> None:
        self.waiter.wait(work, self.cfg.runtime.timeout_s, self._aborted, "a gradient collective")

    def _sync_stage(self, stage: int, source: str) -> None:
        """Broadcast parameters and optimizer state of ``stage`` from ``source`` to its replicas."""
        if self.stage_id != stage or self.stage_group is None:
            return
        options = dist.BroadcastOptions()
        options.rootRank = self.stage_members.index(source)
        for tensor in _state_tensors(self.stage, self.optimizer):
            self._collective(self.stage_group.broadcast([tensor], options))

    def _rebuild_stage(self, stage: int, sources: List[str], plan: Plan) -> None:
        """CheckFree (arXiv 2506.15461): a stage that lost every replica restarts from the average of
        its neighbouring stages' blocks (same shapes required), with a fresh optimizer state. Each
        source sends its block parameters to every node of the rebuilt stage."""
        from skippipe.model.transformer import split_layers

        layers = [len(ls) for ls in split_layers(self.spec.n_layers, plan.num_stages)]
        stage_of = plan.stage_of()
        if any(layers[stage_of[n]] != layers[stage] for n in sources if n in stage_of):
            log.warning("stage %d: neighbours have other layer counts; keeping the initial parameters", stage)
            return
        receivers = [n for n in plan.allocation[stage] if n in self.rank_of]
        if self.me in sources:
            flat = compute.flat_blocks(self.stage)
            for node in receivers:
                self.transport.send(flat, node, -1, stage, GRAD)
            self.transport.flush()
        elif self.stage_id == stage:
            numel = sum(p.numel() for p in self.stage.blocks.parameters())
            dtype = next(self.stage.blocks.parameters()).dtype
            compute.load_block_average(self.stage, [self.transport.recv(source, -1, stage, GRAD, (numel,), dtype)
                                                    for source in sources])

    # -- one step -------------------------------------------------------------------------------
    def commit(self, commit_step: Optional[int]) -> None:
        """Apply the pending update if its step is the one the coordinator declared complete;
        drop it if it belongs to a step that is being redone."""
        from skippipe.train.optim import apply_step

        pending, self.pending = self.pending, None
        if pending is not None and commit_step is not None and pending.step == commit_step:
            apply_step(self.stage, self.optimizer, pending.grad, pending.scale, pending.lr)
            if self._corrupting(pending.step, "param"):
                with torch.no_grad():
                    next(self.stage.parameters()).view(-1)[0] += 1e-3
            if self.level != "off":
                self.state_report = {"step": pending.step, "digests": state_digests(self.stage, self.optimizer)}

    def _corrupting(self, step: int, tensor: str) -> bool:
        """``fault.corrupt``: this node perturbs one element of ``tensor`` at ``step`` and keeps going,
        hashing what it actually computed (an honest-looking ledger of a wrong computation)."""
        return self.corrupt_step == step and self.cfg.fault.corrupt.tensor == tensor

    def take_state_report(self) -> Optional[Dict[str, Any]]:
        report, self.state_report = self.state_report, None
        return report

    def save_checkpoint(self, plan: Optional[Plan], step: int, directory: str,
                        members: List[str]) -> Optional[Dict[str, Any]]:
        """The first live replica of each stage writes ``stage<k>.pt`` (tensors only) and returns its
        manifest entry: a digest per tensor, tagged by the tensor's name, as in the ledger.
        ``members``: the command's (after a failure, the dead replica is no longer the first)."""
        if self.stage is None or plan is None:
            return None
        live = [n for n in plan.allocation[self.stage_id] if n in members]
        if not live or live[0] != self.me:
            return None
        from pathlib import Path

        from skippipe.verify.checkpoint import save_tensors_atomic, tensor_digests

        tensors = dict(state_tensors(self.stage, self.optimizer))
        tensors["meta/step"] = torch.tensor(step, dtype=torch.int64)
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(Path(directory) / f"stage{self.stage_id}.pt", tensors)
        return {"file": f"stage{self.stage_id}.pt", "node": self.me, "tensors": tensor_digests(tensors)}

    def check_paths(self, command: Dict[str, Any]) -> None:
        from skippipe.config import run_dir

        check_command_paths(command, run_dir(self.cfg))

    def load_checkpoint(self, directory: str) -> None:
        """Load this stage's parameters and optimizer state (every replica reads the same file)."""
        if self.stage is None:
            return
        from pathlib import Path

        from skippipe.verify.checkpoint import load_stage_file

        load_state_tensors(self.stage, self.optimizer, load_stage_file(Path(directory) / f"stage{self.stage_id}.pt"))

    def _inject_faults(self, step: int) -> None:
        """``fault.kill`` ends this process; ``fault.error`` raises (tests and demos). A replacement
        (incarnation > 0) does not repeat its predecessor's fault."""
        fault = self.cfg.fault
        if not self.env.fresh:
            return
        if fault.kill.node == self.me and fault.kill.step == step:
            os._exit(137)
        if fault.error.node == self.me and fault.error.step == step:
            raise RuntimeError(f"injected error on node {self.me} at step {step} (fault.error)")

    def step(self, plan: Plan, step: int, lr: float) -> Dict[str, Any]:
        self._inject_faults(step)
        until = self.cfg.fault.slow_until
        self.slowdown = float(self.cfg.fault.slow_nodes.get(self.me, 1.0)) if until is None or step < until else 1.0
        if self.transport.links is not None:
            self.transport.links.factor = slow_links_at(self.cfg.fault, step, self._link_names)
        start = time.perf_counter()
        times = StepTimes()
        hook = None
        if self._corrupting(step, "op") and self.stage is not None:
            from skippipe.verify.ops import perturb_output_hook

            hook = self.stage.get_submodule(self.cfg.fault.corrupt.op).register_forward_hook(perturb_output_hook)
        try:
            losses = self._run_actions(plan, step, times)
        finally:
            if hook is not None:
                hook.remove()
        t0 = time.perf_counter()
        grad_norm = self._reduce(plan, step, lr)
        times.reduce_s = time.perf_counter() - t0
        self.transport.flush()
        return {"ok": True, "losses": {str(k): v for k, v in losses.items()}, "leaves": self.leaves,
                "compute_s": times.compute_s,
                "compute_n": times.compute_n, "compute_cpu_s": times.cpu_s, "reduce_s": times.reduce_s, "grad_norm": grad_norm,
                "recv_wait_s": self.transport.recv_wait_s, "emulated_delay_s": self.transport.emulated_delay_s,
                "links": link_estimates(self.transport.link_samples),
                "step_s": time.perf_counter() - start, "cpu_s": self._cpu_since_last_report(),
                "node": self.me, "stage": self.stage_id,
                "control_rejected": self.control.rejected,
                "peak_rss_mb": _peak_rss_mb()}

    def _cpu_since_last_report(self) -> float:
        """CPU seconds of this whole process (every thread) since its previous step report: the
        step and the wait for its command (benchmarks compare it with other systems' per rank)."""
        now = time.process_time()
        spent, self._cpu_mark = now - getattr(self, "_cpu_mark", now), now
        return spent

    def _timed(self, times: StepTimes, phase: str, fn, *args):
        """Run one compute phase; record wall time (what the pipeline waits for) and, on CPU, this
        thread's CPU time (what the node's speed is: immune to other processes sharing the cores)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        result = fn(*args)
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
        if self.slowdown != 1.0:  # fault.slow_nodes: emulate a slower device
            time.sleep(elapsed * (self.slowdown - 1.0))
            elapsed *= self.slowdown
            cpu *= self.slowdown
        times.compute_s[phase] += elapsed
        times.cpu_s[phase] += cpu if self.device.type == "cpu" else elapsed
        times.compute_n[phase] += 1
        return result

    def _run_actions(self, plan: Plan, step: int, times: StepTimes) -> Dict[int, float]:
        cfg, stage = self.cfg, self.stage
        routes = {mb.id: mb for mb in plan.microbatches}
        self.acc = compute.GradAccumulator(stage, plan.visits_of(self.me)) if stage is not None else None
        self.transport.recv_wait_s = self.transport.emulated_delay_s = 0.0
        self.transport.link_samples = []
        act_shape = (cfg.train.samples_per_microbatch, self.spec.seq_len, self.spec.dim)
        dtype = next(stage.parameters()).dtype if stage is not None else torch.float32
        saved, targets, losses = {}, {}, {}
        self.leaves: Dict[str, str] = {}
        full = self.level == "full"
        stage_of = plan.stage_of()
        for mb_id, phase in plan.node_order.get(self.me, []):
            nodes = [routes[mb_id].originator, *routes[mb_id].path]
            i = nodes.index(self.me)
            after = nodes[i + 1] if i + 1 < len(nodes) else nodes[0]
            if phase == "F":
                if i == 0:
                    mb = self.data.microbatch(cfg.run.seed, step, mb_id, cfg.train.samples_per_microbatch,
                                              self.spec.seq_len)
                    x, targets[mb_id] = mb.inputs.to(self.device), mb.targets.to(self.device)
                    if self.level != "off":
                        self.leaves.update(data_leaf(mb))
                else:
                    x = self.transport.recv(nodes[i - 1], step, mb_id, ACT, act_shape, dtype)
                out, saved[mb_id] = self._timed(times, "F", compute.forward, stage, x)
                if self._corrupting(step, "act"):
                    out = out.clone()
                    out.view(-1)[0] += 1e-3
                    self.corrupt_step = None  # one element of one activation
                if full:
                    self.leaves.update(hop_leaf("act", mb_id, i, self.stage_id, out))
                self.transport.send(out, after, step, mb_id, ACT)
            elif phase == "L":
                hidden = self.transport.recv(nodes[-1], step, mb_id, ACT, act_shape, dtype)
                loss, grad, head_grads = self._timed(times, "L", compute.loss_and_head_grads, stage, hidden,
                                                     targets.pop(mb_id))
                self.acc.add(mb_id, compute.head_params(stage), head_grads)
                losses[mb_id] = float(loss)
                if full:
                    self.leaves.update(hop_leaf("grad", mb_id, len(nodes) - 1, 0, grad))
                self.transport.send(grad, nodes[-1], step, mb_id, GRAD)
            else:
                grad = self.transport.recv(after, step, mb_id, GRAD, act_shape, dtype)
                grad_in, body_grads = self._timed(times, "B", compute.backward, stage, saved.pop(mb_id), grad)
                self.acc.add(mb_id, compute.body_params(stage), body_grads)
                self.acc.complete(mb_id)
                if i > 0:
                    if full:
                        self.leaves.update(hop_leaf("grad", mb_id, i - 1, stage_of[self.me], grad_in))
                    self.transport.send(grad_in, nodes[i - 1], step, mb_id, GRAD)
        return losses

    def _reduce(self, plan: Plan, step: int, lr: float) -> float:
        """Stage gradient = replica sums in allocation order / M; global norm summed in stage order.
        The clipped update is held until the coordinator commits this step."""
        num_mb = len(plan.microbatches)
        grad = None
        if self.stage is not None:
            mine = self.acc.result()
            if self._corrupting(step, "grad"):
                mine = mine.clone()
                mine[0] += 1e-3
            if self.stage_group is None:
                totals = [mine]
            else:  # gathered in allocation order of the live replicas
                totals = [torch.empty_like(mine) for _ in self.stage_members]
                self._collective(self.stage_group.allgather([totals], [mine]))
                self.transport.emulate_allreduce(self.stage_members, mine.numel() * mine.element_size())
            grad = compute.reduce_replicas(totals, num_mb)
        # global norm: one squared norm per stage (replicas agree), summed in stage order
        entry = torch.zeros(2, dtype=torch.float64, device=self.device)
        entry[0] = -1.0 if self.stage_id is None else float(self.stage_id)
        if grad is not None:
            entry[1] = compute.grad_sq_norm(grad).to(self.device)
        entries = [torch.empty_like(entry) for _ in self.members]
        self._collective(self.world_pg.allgather([entries], [entry]))
        per_stage = {}
        for e in entries:
            stage_id = int(e[0])
            if stage_id >= 0 and stage_id not in per_stage:
                per_stage[stage_id] = e[1].cpu()
        norm, scale = compute.clip_coefficient([per_stage[k] for k in sorted(per_stage)], self.cfg.train.grad_clip)
        if self.level != "off":
            self.leaves.update(gnorm_leaves(per_stage))
        if grad is not None:
            self.pending = PendingUpdate(step, grad, scale, lr)
        return norm

    # -- end --------------------------------------------------------------------------------------
    def save_final(self, plan: Plan, out_dir: str) -> None:
        """The first live replica of each stage writes its parameters (tensors only) for eval."""
        live = [n for n in plan.allocation[self.stage_id] if n in self.rank_of] if self.stage is not None else []
        if not live or live[0] != self.me:
            return
        from pathlib import Path

        target = Path(out_dir) / "final"
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".stage{self.stage_id}.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in self.stage.state_dict().items()}, tmp)
        tmp.replace(target / f"stage{self.stage_id}.pt")

    def close(self) -> None:
        """Drop this generation's groups. They are not destroyed: a receive abandoned after a failure
        may still be blocked in one until the group timeout, and then ends harmlessly. They are not
        released either: the last reference going would run the group's destructor, which joins its
        threads, so the next generation would wait for that timeout (measured: 30 s per failure)."""
        self._retired.extend(g for g in (self.world_pg, self.stage_group) if g is not None)
        self.world_pg = self.stage_group = self.transport = None
        self.generation = -1


def slow_links_at(fault, step: int, names) -> Callable[[str, str], float]:
    """The ``LinkModel.factor`` of ``step``: ``fault.slow_links`` between ``slow_links_from`` and
    ``slow_links_until`` (both directions of each named link), 1.0 otherwise."""
    from skippipe.topology import split_link

    start, until = fault.slow_links_from, fault.slow_links_until
    if not fault.slow_links or (start is not None and step < start) or (until is not None and step >= until):
        return lambda a, b: 1.0
    factors = {}
    for key, factor in fault.slow_links.items():
        pair = split_link(str(key), names)
        if pair is not None:
            factors[pair] = factors[pair[::-1]] = float(factor)
    return lambda a, b: factors.get((a, b), 1.0)


def check_command_paths(command: Dict[str, Any], run_directory) -> None:
    """Every path a command names (final model, checkpoint, load, restore) must lie inside the run's
    directory: commands are authenticated, and even so a worker never writes or reads elsewhere."""
    from pathlib import Path

    root = Path(run_directory).resolve()
    paths = [command.get("save_dir"), (command.get("checkpoint") or {}).get("dir"), command.get("load"),
             *(command.get("restore") or {}).values()]
    for path in paths:
        if path is not None and not Path(path).resolve().is_relative_to(root):
            raise RuntimeError(f"refusing a command path outside the run directory {root}: {path}")


def _make_group(backend: str, store, rank: int, size: int, timeout: timedelta):
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, size, options)
    raise ValueError(f"runtime.backend={backend!r}: use gloo or nccl")


def _state_tensors(stage, optimizer) -> List[torch.Tensor]:
    """Parameters, then AdamW moments and step counters, in a fixed order (for replica sync)."""
    tensors = [p.data for p in stage.parameters()]
    for p in stage.parameters():
        state = optimizer.state[p]
        if not state:  # a fresh optimizer: create the state the source will send
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        tensors += [state["exp_avg"], state["exp_avg_sq"], state["step"]]
    return tensors


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def describe_error(err: BaseException) -> Dict[str, Any]:
    """One line for the coordinator. ``secondary`` marks errors caused by a failed peer (not to be
    blamed); ``bad_peer`` names a peer that sent a message that does not match the plan."""
    text = str(err).splitlines()[0] if str(err) else ""
    peer = err.peer if isinstance(err, TransportError) else None
    bad_message = isinstance(err, TransportError) and "bad message" in text
    secondary = ((peer is not None and not bad_message) or isinstance(err, Aborted)
                 or any(w in str(err) for w in _PEER_FAILURE_WORDS))
    return {"ok": False, "message": f"{type(err).__name__}: {text}", "peer": peer, "secondary": secondary,
            "bad_peer": peer if bad_message else None, "time": time.time()}


def _heartbeat(control_addr, port, namespace, name, period_s, stop: threading.Event) -> None:
    """A separate store connection, so a worker stuck in compute or a receive still beats. A failed
    beat reconnects (a thread that died on one store error silenced a healthy worker); the thread
    ends with the process."""
    channel = None
    while not stop.wait(period_s):
        try:
            if channel is None:
                channel = ControlChannel(connect_store(control_addr, port, False, 30.0), 30.0, namespace)
            channel.heartbeat(name)
        except Exception as err:  # noqa: BLE001 - the coordinator may be gone; the main loop will notice
            log.debug("heartbeat of %s failed (%s); reconnecting", name, err)
            channel = None


def _process_age_s() -> Optional[float]:
    """Seconds since this process (a Ray actor: its constructor) started: its start-up cost,
    reported with ``ready``."""
    if os.environ.get("SKIPPIPE_STARTED_AT"):  # a Ray actor may run in a process Ray started earlier
        return round(time.time() - float(os.environ["SKIPPIPE_STARTED_AT"]), 3)
    try:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 3)
    except Exception:  # noqa: BLE001 - informative only
        return None


def serve(env: WorkerEnv, control: ControlChannel, namespace: str = "") -> None:
    """The worker loop: wait for each command, run it, report; stop when told."""
    worker = Worker(env, control)
    torch.set_num_threads(worker.cfg.run.threads)
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(env.master_addr, env.master_port, namespace, worker.me,
                                              worker.cfg.fault.heartbeat_s, stop), daemon=True).start()
    control.put(f"ready/{worker.me}/{env.incarnation}", {"time": time.time(), "process_s": _process_age_s()})
    index = control.wait_for(f"first/{worker.me}/{env.incarnation}", timeout_s=worker.cfg.runtime.timeout_s * 4)
    plan = None
    try:
        while True:
            command = control.wait_for(f"cmd/{index}", timeout_s=worker.cfg.runtime.timeout_s * 4)
            worker.command_index = index
            if command.get("abort"):
                raise RuntimeError(f"the coordinator aborted the run: {command['abort']}")
            if worker.me not in command.get("members", [worker.me]):
                return  # excluded from the new generation
            expected = len(command.get("members", []))  # the last of them to report rings the doorbell
            extra: Dict[str, Any] = {}
            try:
                worker.check_paths(command)
                worker.commit(command.get("commit_step"))
                ckpt = command.get("checkpoint")
                extra = {"state": worker.take_state_report(),
                         "ckpt": worker.save_checkpoint(plan, ckpt["step"], ckpt["dir"], command["members"]) if ckpt else None}
                if command.get("stop"):
                    if plan is not None and command.get("save_dir"):
                        worker.save_final(plan, command["save_dir"])
                    control.report(index, worker.me, {"ok": True, "stopped": True, **extra}, expected)
                    return
                plan = Plan.from_dict(command["plan"])
                if command["generation"] != worker.generation:
                    worker.setup(command, plan)
                if command.get("load"):
                    worker.load_checkpoint(command["load"])
                control.report(index, worker.me, {**worker.step(plan, command["step"], command["lr"]), **extra},
                               expected)
            except Exception as err:  # report, drop this generation's groups, wait for the next command
                info = {**describe_error(err), "state": extra.get("state") or worker.take_state_report(),
                        "ckpt": extra.get("ckpt")}
                control.report(index, worker.me, info, expected)
                if info["secondary"]:  # caused by a peer: one line; the coordinator names the cause
                    log.warning("step abandoned: %s", info["message"][:200])
                else:
                    traceback.print_exc(file=sys.stderr)
                worker.close()
            index += 1
    finally:
        stop.set()
        worker.close()


def run_worker(env: WorkerEnv, control: ControlChannel, namespace: str = "") -> int:
    try:
        serve(env, control, namespace)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


def main() -> int:
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads))
    env = WorkerEnv.from_environ()
    logging.basicConfig(level=logging.WARNING, format=f"[{env.node or env.rank}] %(levelname)s %(message)s")
    namespace = os.environ.get("SKIPPIPE_NAMESPACE", "")
    control = ControlChannel(connect_store(env.master_addr, env.master_port, False, 60.0), 60.0, namespace)
    code = run_worker(env, control, namespace)
    # skip interpreter teardown: a receive abandoned after a failure may still block in a helper thread
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
