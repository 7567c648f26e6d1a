"""The worker: one node holding one pipeline stage. Launcher-agnostic.

Reads the torchrun environment contract (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
MASTER_PORT is the coordinator's control store), so ``launcher=local``, torchrun and Ray actors all
run this same code. Each step it receives the plan from the coordinator and runs, in the plan's
per-node order, the actions that concern it: receive activations, forward, send on (or back to the
originator), loss at the originator, backward along the exact reverse path. Then it reduces its
stage's gradient with the stage's replicas in allocation order, clips by the global norm (summed in
stage order), takes an AdamW step and reports measured times and losses.

Run as ``python -m skippipe.runtime.worker`` with those variables set.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist

from skippipe.plan import Plan
from skippipe.runtime.control import ControlChannel, connect_store
from skippipe.runtime.transport import ACT, GRAD, LinkModel, Transport, TransportError
from skippipe.train import compute

log = logging.getLogger("skippipe.worker")


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_environ(cls, environ=os.environ) -> "WorkerEnv":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in environ]
        if missing:
            raise RuntimeError(f"worker: environment variables {', '.join(missing)} are not set "
                               "(start workers with skippipe train, torchrun or the Ray launcher)")
        return cls(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                   environ["MASTER_ADDR"], int(environ["MASTER_PORT"]))


@dataclass
class StepTimes:
    compute_s: Dict[str, float] = field(default_factory=lambda: {"F": 0.0, "L": 0.0, "B": 0.0})
    compute_n: Dict[str, int] = field(default_factory=lambda: {"F": 0, "L": 0, "B": 0})
    reduce_s: float = 0.0


class Worker:
    """Lifecycle: connect -> setup (on the first plan) -> step ... -> save -> close."""

    def __init__(self, env: WorkerEnv, control: ControlChannel):
        self.env = env
        self.control = control
        message = control.wait_for("config")
        from skippipe.config import from_dict

        self.cfg = from_dict(message["config"])
        self.nodes: List[str] = message["nodes"]
        self.vocab_size: int = message["vocab_size"]
        self.me = self.nodes[env.rank]
        self.device = self._device()
        self.stage = None
        self.generation = -1

    def _device(self) -> torch.device:
        name = self.cfg.train.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            torch.cuda.set_device(self.env.local_rank)
            return torch.device("cuda", self.env.local_rank)
        return torch.device(name)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, plan: Plan, generation: int) -> None:
        from skippipe.model.presets import resolve_model_spec
        from skippipe.model.transformer import build_stages
        from skippipe.train.optim import make_optimizer

        cfg = self.cfg
        self.spec = resolve_model_spec(cfg.model, vocab_size=self.vocab_size)
        stage_of = plan.stage_of()
        self.stage_id = stage_of.get(self.me)
        if self.stage_id is not None and self.stage is None:
            self.stage = build_stages(self.spec, plan.num_stages, cfg.run.seed, only=[self.stage_id])[self.stage_id]
            self.stage.to(self.device)
            self.optimizer = make_optimizer(self.stage, cfg.train)
        if self.stage_id == 0 and not hasattr(self, "data"):
            from skippipe.data import load_data

            self.data = load_data(cfg.data)
        self._init_groups(plan, generation)

    def _init_groups(self, plan: Plan, generation: int) -> None:
        backend = self.cfg.runtime.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.cfg.runtime.timeout_s)
        store = dist.PrefixStore(f"pg/{generation}", self.control.raw)
        dist.init_process_group(backend, store=store, rank=self.env.rank, world_size=self.env.world_size,
                                timeout=timeout)
        self.rank_of = {name: rank for rank, name in enumerate(self.nodes)}
        # every rank creates every stage group, in stage order (new_group is collective)
        self.stage_groups = {}
        for stage, members in enumerate(plan.allocation):
            ranks = sorted(self.rank_of[n] for n in members)
            group = dist.new_group(ranks=ranks, timeout=timeout) if len(ranks) > 1 else None
            self.stage_groups[stage] = (group, ranks)
        links = None
        if self.cfg.cost.emulate_links:
            from skippipe.topology import load_topology

            topo = load_topology(self.cfg)
            links = LinkModel(topo.latency_s, topo.bandwidth_bytes_per_s)
        self.transport = Transport(self.rank_of, self.me, self.device, self.cfg.runtime.timeout_s, links)
        self.generation = generation

    # -- one step -------------------------------------------------------------------------------
    def _inject_faults(self, step: int) -> None:
        """``fault.kill`` ends this process; ``fault.error`` raises (tests and demos)."""
        fault = self.cfg.fault
        if fault.kill.node == self.me and fault.kill.step == step:
            os._exit(137)
        if fault.error.node == self.me and fault.error.step == step:
            raise RuntimeError(f"injected error on node {self.me} at step {step} (fault.error)")

    def step(self, plan: Plan, step: int, lr: float) -> Dict:
        self._inject_faults(step)
        start = time.perf_counter()
        times = StepTimes()
        losses = self._run_actions(plan, step, times)
        t0 = time.perf_counter()
        grad_norm = self._reduce_and_update(plan, lr)
        times.reduce_s = time.perf_counter() - t0
        self.transport.flush()
        return {"losses": {str(k): v for k, v in losses.items()}, "compute_s": times.compute_s,
                "compute_n": times.compute_n, "reduce_s": times.reduce_s, "grad_norm": grad_norm,
                "recv_wait_s": self.transport.recv_wait_s, "emulated_delay_s": self.transport.emulated_delay_s,
                "step_s": time.perf_counter() - start, "node": self.me, "stage": self.stage_id,
                "peak_rss_mb": _peak_rss_mb()}

    def _run_actions(self, plan: Plan, step: int, times: StepTimes) -> Dict[int, float]:
        cfg, stage = self.cfg, self.stage
        routes = {mb.id: mb for mb in plan.microbatches}
        self.acc = compute.GradAccumulator(stage, plan.visits_of(self.me)) if stage is not None else None
        self.transport.recv_wait_s = self.transport.emulated_delay_s = 0.0
        act_shape = (cfg.train.samples_per_microbatch, self.spec.seq_len, self.spec.dim)
        dtype = next(stage.parameters()).dtype if stage is not None else torch.float32
        saved, targets, losses = {}, {}, {}
        for mb_id, phase in plan.node_order.get(self.me, []):
            nodes = [routes[mb_id].originator, *routes[mb_id].path]
            i = nodes.index(self.me)
            after = nodes[i + 1] if i + 1 < len(nodes) else nodes[0]
            if phase == "F":
                if i == 0:
                    mb = self.data.microbatch(cfg.run.seed, step, mb_id, cfg.train.samples_per_microbatch,
                                              self.spec.seq_len)
                    x, targets[mb_id] = mb.inputs.to(self.device), mb.targets.to(self.device)
                else:
                    x = self.transport.recv(nodes[i - 1], step, mb_id, ACT, act_shape, dtype)
                t0 = time.perf_counter()
                out, saved[mb_id] = compute.forward(stage, x)
                times.compute_s["F"] += time.perf_counter() - t0
                times.compute_n["F"] += 1
                self.transport.send(out, after, step, mb_id, ACT)
            elif phase == "L":
                hidden = self.transport.recv(nodes[-1], step, mb_id, ACT, act_shape, dtype)
                t0 = time.perf_counter()
                loss, grad, head_grads = compute.loss_and_head_grads(stage, hidden, targets.pop(mb_id))
                times.compute_s["L"] += time.perf_counter() - t0
                times.compute_n["L"] += 1
                self.acc.add(mb_id, compute.head_params(stage), head_grads)
                losses[mb_id] = float(loss)
                self.transport.send(grad, nodes[-1], step, mb_id, GRAD)
            else:
                grad = self.transport.recv(after, step, mb_id, GRAD, act_shape, dtype)
                t0 = time.perf_counter()
                grad_in, body_grads = compute.backward(stage, saved.pop(mb_id), grad)
                times.compute_s["B"] += time.perf_counter() - t0
                times.compute_n["B"] += 1
                self.acc.add(mb_id, compute.body_params(stage), body_grads)
                self.acc.complete(mb_id)
                if i > 0:
                    self.transport.send(grad_in, nodes[i - 1], step, mb_id, GRAD)
        return losses

    def _reduce_and_update(self, plan: Plan, lr: float) -> float:
        """Stage gradient = replica sums in allocation order / M; global-norm clip; AdamW step."""
        from skippipe.train.optim import apply_step

        num_mb = len(plan.microbatches)
        grad = None
        if self.stage is not None:
            mine = self.acc.result()
            group, ranks = self.stage_groups[self.stage_id]
            if group is None:
                totals = [mine]
            else:
                gathered = [torch.empty_like(mine) for _ in ranks]
                dist.all_gather(gathered, mine, group=group)
                by_rank = dict(zip(ranks, gathered))
                totals = [by_rank[self.rank_of[n]] for n in plan.allocation[self.stage_id]]
            grad = compute.reduce_replicas(totals, num_mb)
        # global norm: one squared norm per stage (replicas agree), summed in stage order
        mine_sq = compute.grad_sq_norm(grad) if grad is not None else torch.zeros((), dtype=torch.float64)
        entry = torch.tensor([-1.0 if self.stage_id is None else float(self.stage_id), float("nan")],
                             dtype=torch.float64, device=self.device)
        entry[1] = mine_sq.to(self.device)
        entries = [torch.empty_like(entry) for _ in range(self.env.world_size)]
        dist.all_gather(entries, entry)
        per_stage = {}
        for e in entries:
            stage_id = int(e[0])
            if stage_id >= 0 and stage_id not in per_stage:
                per_stage[stage_id] = e[1].cpu()
        norm, scale = compute.clip_coefficient([per_stage[k] for k in sorted(per_stage)], self.cfg.train.grad_clip)
        if grad is not None:
            apply_step(self.stage, self.optimizer, grad, scale, lr)
        return norm

    # -- end --------------------------------------------------------------------------------------
    def save_final(self, plan: Plan, out_dir: str) -> None:
        """The first replica of each stage writes its parameters (tensors only) for eval."""
        if self.stage is None or plan.allocation[self.stage_id][0] != self.me:
            return
        from pathlib import Path

        target = Path(out_dir) / "final"
        target.mkdir(parents=True, exist_ok=True)
        tmp = target / f".stage{self.stage_id}.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in self.stage.state_dict().items()}, tmp)
        tmp.replace(target / f"stage{self.stage_id}.pt")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def serve(env: WorkerEnv, control: ControlChannel) -> None:
    """The worker loop: wait for each step's command, run it, report; stop when told."""
    worker = Worker(env, control)
    torch.set_num_threads(worker.cfg.run.threads)
    step = 0
    plan = None
    try:
        while True:
            command = control.wait_for(f"cmd/{step}", timeout_s=worker.cfg.runtime.timeout_s * 4)
            if command.get("abort"):
                raise RuntimeError(f"the coordinator aborted the run: {command['abort']}")
            if command.get("stop"):
                if plan is not None and command.get("save_dir"):
                    worker.save_final(plan, command["save_dir"])
                control.report(step, env.rank, {"stopped": True})
                break
            plan = Plan.from_dict(command["plan"])
            if command["generation"] != worker.generation:
                worker.setup(plan, command["generation"])
            control.report(step, env.rank, worker.step(plan, command["step"], command["lr"]))
            step += 1
    except Exception as err:
        report_error(control, env.rank, err)
        raise
    finally:
        worker.close()


def main() -> int:
    threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(threads))
    env = WorkerEnv.from_environ()
    logging.basicConfig(level=logging.WARNING, format=f"[rank {env.rank}] %(levelname)s %(message)s")
    control = ControlChannel(connect_store(env.master_addr, env.master_port, False, 60.0), timeout_s=60.0,
                             namespace=os.environ.get("SKIPPIPE_NAMESPACE", ""))
    return run_worker(env, control)


_PEER_FAILURE_WORDS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def report_error(control: ControlChannel, rank: int, err: BaseException) -> None:
    """One line to the coordinator, before our connections close, so the root cause is reported
    first; errors caused by a failed peer are marked ``secondary`` so they are not blamed."""
    text = str(err).splitlines()[0] if str(err) else ""
    peer = err.peer if isinstance(err, TransportError) else None
    secondary = peer is not None or any(word in str(err) for word in _PEER_FAILURE_WORDS)
    control.error(rank, {"message": f"{type(err).__name__}: {text}", "peer": peer, "secondary": secondary,
                         "time": time.time()})


def run_worker(env: WorkerEnv, control: ControlChannel) -> int:
    """Serve until stopped; on failure report one line to the coordinator and return 1."""
    try:
        serve(env, control)
    except Exception:  # the full trace to our stderr; the one line went to the coordinator in serve
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
