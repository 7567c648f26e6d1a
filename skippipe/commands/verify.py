"""``skippipe verify RUN [--against OTHER] [--referee] [--ops] [--json] [--no-replay]`` (DESIGN.md 7, 9).

One run (Verde's trainer-vs-verifier case, arXiv 2502.19405): check the ledger chain and every
step's Merkle roots against its leaves, check every checkpoint against its manifest and the ledger
(before any replay), then replay the run segment by segment (from initialization, then from each
verified checkpoint) and compare every step root with the ledger. Prints ``OK`` and the guarantee it
gives (exit 0), or the first differing step, stage, microbatch and leaf (exit 1).

Two runs (``--against OTHER``, Verde phase 1): the headers must be comparable (same build, CPU
capability, threads, seed and bit-relevant config); bisect the two chains to the first divergent step
in O(log n) lookups with no compute, diff that step's leaves and name the earliest differing one.
``--referee`` replays the divergent step from the newest checkpoint before it that verifies against
both ledgers (or from initialization) and says which run the replay reproduces. ``--ops`` hands the
disputed step and leaf to ``skippipe.verify.ops.pin_operator`` (Verde phase 2).

Runs whose headers differ exit 1 with "not comparable" and the fields: the question "do these runs
agree?" is well posed but cannot be answered with a yes, which is a failed verification (exit 1),
not malformed input (exit 2). Exit 2 is kept for bad input: a missing run, a truncated ledger file.

``--json`` prints ``{"ok", "first_divergent_step", "stage", "microbatch", "leaf", "replayed_steps"}``
plus ``mode``, ``check`` (ledger, checkpoint, replay, compare), ``message``, ``guarantee`` and, with
``--against``, ``comparable``, ``differences``, ``lookups``, ``steps_compared``, ``hop``,
``differing_leaves``, ``referee`` and ``ops``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

from skippipe.errors import UserError, VerificationFailed
from skippipe.verify.checkpoint import check_checkpoint, final_model_problem, list_checkpoints, verify_checkpoint
from skippipe.verify.compare import describe_leaf, diff_leaves, differing_stages, first_divergent_step
from skippipe.verify.ledger import (
    Ledger,
    check_chain,
    check_links,
    comparable,
    describe_differences,
    environment_differences,
    read_ledger,
    root_mismatch,
    step_record,
)


def add_arguments(parser) -> None:
    parser.add_argument("run", help="run directory (runs/<name>) with ledger/ and ckpt/")
    parser.add_argument("--against", metavar="OTHER", help="compare with another run of the same config")
    parser.add_argument("--referee", action="store_true",
                        help="with --against: replay the divergent step and say which run is right")
    parser.add_argument("--ops", action="store_true",
                        help="with --against: pin the first operator whose inputs agree and output differs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-replay", action="store_true",
                        help="one run: check the chain and checkpoints only (integrity, no recomputation)")


def run(args) -> int:
    if (args.referee or args.ops) and not args.against:
        raise UserError("--referee and --ops compare two runs; add --against OTHER")
    if args.against:
        result = verify_against(Path(args.run), Path(args.against), referee=args.referee, ops=args.ops)
    else:
        result = verify_run(Path(args.run), replay=not args.no_replay)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "lines"}, indent=1))
    else:
        print("\n".join(result["lines"]))
    if not result["ok"]:
        raise VerificationFailed(result["message"])
    return 0


def _result(mode: str) -> dict:
    return {"ok": True, "first_divergent_step": None, "stage": None, "microbatch": None, "leaf": None,
            "replayed_steps": 0, "hop": None, "mode": mode, "check": None, "message": None, "guarantee": None, "lines": []}


def _fail(result: dict, check: str, message: str, step: Optional[int] = None, leaf: Optional[str] = None,
          stage: Optional[int] = None) -> dict:
    info = describe_leaf(leaf) if leaf else {}
    if leaf:  # a global leaf (data, route, loss) has no stage, whatever else differs later
        stage = info.get("stage")
    result.update(ok=False, check=check, message=message, first_divergent_step=step, leaf=leaf, stage=stage,
                  microbatch=info.get("microbatch"), hop=info.get("hop"))
    result["lines"].append(f"{'DIVERGED' if check in ('compare', 'replay') else 'FAILED'} ({check}): {message}")
    if step is not None:
        where = ", ".join(f"{k} {v}" for k, v in (("stage", stage), ("microbatch", result["microbatch"]),
                                                   ("hop", result["hop"])) if v is not None)
        result["lines"].append(f"  first divergent step: {step}" + (f" ({where})" if where else ""))
    if leaf:
        tensor = f", tensor {info['tensor']}" if info.get("tensor") else ""
        result["lines"].append(f"  earliest differing leaf: {leaf}{tensor}")
    return result


def load_replay() -> Optional[Callable]:
    """``skippipe.verify.replay.replay(run_dir, from_step, to_step) -> {step: leaves}`` (tests replace
    this to return None: replay unavailable)."""
    from skippipe.verify.replay import replay

    return replay


# ---------------------------------------------------------------------------------------------
# one run


def verify_run(run_dir: Path, replay: bool = True) -> dict:
    """Chain, roots, checkpoints, then replay; returns the result dict (see the module docstring)."""
    result = _result("run")
    ledger = read_ledger(run_dir)
    n = ledger.num_steps
    if _ledger_failed(result, ledger, run_dir):
        return result
    checkpoints = list_checkpoints(run_dir)
    for step in checkpoints:
        problem = check_checkpoint(run_dir / "ckpt" / str(step), ledger)
        if problem:
            return _fail(result, "checkpoint", problem.message, step=problem.step, leaf=problem.leaf,
                         stage=problem.stage)
    finals, problem = final_model_problem(run_dir)
    if problem:
        return _fail(result, "final", problem)
    result["lines"].append(f"ledger: chain of {n} steps and every step's Merkle roots are consistent")
    result["lines"].append(f"checkpoints: {len(checkpoints)} verified against their manifests and the ledger"
                           + (f" (steps {', '.join(map(str, checkpoints))})" if checkpoints else ""))
    if finals:
        result["lines"].append(f"final model: {finals} stage files match the digests the run wrote beside them")
    integrity = ("integrity only: the ledger is internally consistent and every checkpoint matches it; "
                 "the computation was not recomputed")
    replay_fn = load_replay() if replay else None
    if replay_fn is None:
        why = "skipped (--no-replay)" if not replay else "unavailable (skippipe.verify.replay is not installed)"
        result.update(guarantee=f"{integrity} (replay {why})", replay="skipped" if not replay else "unavailable")
        result["lines"] += [f"replay: {why}", f"OK ({integrity})"]
        return result
    differ = environment_differences(ledger.header)
    if differ:
        raise UserError(f"cannot replay {run_dir} bit for bit on this machine: it differs from the run's header in "
                        f"{', '.join(describe_differences(ledger.header, _here(), differ))}; verify on a matching "
                        f"machine or pass --no-replay")
    if _replay_failed(result, ledger, run_dir, checkpoints, replay_fn):
        return result
    origins = "initialization" + (f" and {len(checkpoints)} verified checkpoints" if checkpoints else "")
    guarantee = (f"full replay: all {n} step roots were recomputed from {origins} with this build and CPU "
                 f"capability and equal the ledger, so the ledger is the honest result of the run's config "
                 f"and routes, bit for bit")
    result.update(guarantee=guarantee, replay="full")
    result["lines"] += [f"replay: {result['replayed_steps']} steps recomputed, every step root matches",
                        f"OK ({guarantee})"]
    return result


def _here() -> dict:
    from skippipe.verify.ledger import environment

    return environment()


def _ledger_failed(result: dict, ledger: Ledger, run_dir: Path) -> bool:
    bad = check_chain(ledger)
    if bad is None:
        return False
    step, why = bad
    stages = []
    if "does not match its leaves" in why:
        stages = [s for s in differing_stages(ledger.line(step), step_record(step, ledger.leaves(step)))
                  if s is not None]
    _fail(result, "ledger", f"{run_dir}: {why}", step=step, stage=stages[0] if stages else None)
    return True


def _segments(n: int, checkpoints: List[int]) -> List[tuple]:
    """(from_step, to_step) ranges: from initialization, then from the state after each checkpoint."""
    if n <= 0:
        return []
    starts = [0] + [c + 1 for c in checkpoints if c + 1 < n]
    starts = sorted(set(starts))
    return [(s, (starts[i + 1] - 1) if i + 1 < len(starts) else n - 1) for i, s in enumerate(starts)]


def _replay_failed(result: dict, ledger: Ledger, run_dir: Path, checkpoints: List[int],
                   replay_fn: Callable) -> bool:
    """Replay segment by segment in step order; stop at the first step whose root differs."""
    for from_step, to_step in _segments(ledger.num_steps, checkpoints):
        replayed = replay_fn(run_dir, from_step, to_step)
        for step in range(from_step, to_step + 1):
            if step not in replayed:
                raise UserError(f"replay of {run_dir} steps {from_step}..{to_step} returned no leaves for step {step}")
            result["replayed_steps"] += 1
            if step_record(step, replayed[step])["root"] == ledger.root(step):
                continue
            recorded = ledger.leaves(step)
            diff = diff_leaves(recorded, replayed[step])
            leaf = diff[0] if diff else None
            _fail(result, "replay", f"{run_dir}: step {step} does not replay"
                  + (f": leaf {leaf} differs ({len(diff)} leaves differ)" if leaf else ""), step=step, leaf=leaf)
            result["differing_leaves"] = len(diff)
            return True
    return False


# ---------------------------------------------------------------------------------------------
# two runs


def verify_against(run_a: Path, run_b: Path, referee: bool = False, ops: bool = False) -> dict:
    """Compare two runs' ledgers (bisection, leaf diff); optional referee replay and operator pinning."""
    result = _result("against")
    result.update(comparable=True, differences=[], lookups=0, steps_compared=0, hop=None, differing_leaves=0,
                  referee=None, ops=None)
    la, lb = read_ledger(run_a), read_ledger(run_b)
    differ = comparable(la.header, lb.header)
    if differ:
        result.update(comparable=False, differences=differ)
        details = describe_differences(la.header, lb.header, differ)
        result["lines"] += ["not comparable: the headers differ in fields that change the bits:"] + \
                           [f"  {d}" for d in details]
        result.update(ok=False, check="compare",
                      message=f"not comparable: {run_a} and {run_b} differ in {', '.join(differ)}")
        return result
    for label, ledger in ((run_a, la), (run_b, lb)):
        bad = check_links(ledger)
        if bad:
            return _fail(result, "ledger", f"{label}: {bad[1]}", step=bad[0])
    n = min(la.num_steps, lb.num_steps)
    step, lookups = first_divergent_step(la.chain, lb.chain, n)
    result.update(lookups=lookups, steps_compared=n)
    if step is None:
        return _agree(result, run_a, run_b, la, lb, n, lookups)
    _locate(result, run_a, run_b, la, lb, step, lookups)
    if referee and result["check"] == "compare":
        result["referee"] = _referee(result, run_a, run_b, la, lb, step)
    if ops and result["check"] == "compare":
        result["ops"] = _pin_operator(result, run_a, run_b, step, result["leaf"])
    return result


def _agree(result: dict, run_a: Path, run_b: Path, la: Ledger, lb: Ledger, n: int, lookups: int) -> dict:
    guarantee = (f"chain comparison: the chains agree at all {n} common steps ({lookups} lookups), so both runs "
                 f"committed to identical data, routes, losses and states at every step; this does not show "
                 f"that either computed correctly (replay one: skippipe verify RUN)")
    result["guarantee"] = guarantee
    if la.num_steps != lb.num_steps:
        longer, more = (run_a, la.num_steps - n) if la.num_steps > n else (run_b, lb.num_steps - n)
        result["lines"].append(f"note: {longer} has {more} more steps than the other run; compared the first {n}")
    result["lines"].append(f"OK ({guarantee})")
    return result


def _locate(result: dict, run_a: Path, run_b: Path, la: Ledger, lb: Ledger, step: int, lookups: int) -> None:
    """Fill the result with the earliest differing leaf of the first divergent step."""
    line_a, line_b = la.line(step), lb.line(step)
    leaves_a, leaves_b = la.leaves(step), lb.leaves(step)
    for label, line, leaves in ((run_a, line_a, leaves_a), (run_b, line_b, leaves_b)):
        why = root_mismatch(line, leaves)
        if why:  # that run's claim does not even follow from its own leaves
            _fail(result, "ledger", f"{label}: step {step}: {why}", step=step)
            return
    diff = diff_leaves(leaves_a, leaves_b)
    stages = [s for s in differing_stages(line_a, line_b) if s is not None]
    leaf = diff[0] if diff else None
    message = (f"{run_a} and {run_b} diverge at step {step}"
               + (f": earliest differing leaf {leaf} ({len(diff)} leaves differ)" if leaf else ""))
    _fail(result, "compare", message, step=step, leaf=leaf, stage=stages[0] if stages else None)
    result.update(differing_leaves=len(diff), stages_differing=stages,
                  guarantee=f"chain bisection ({lookups} lookups): both runs committed identical data, routes, "
                            f"losses and states at every step before {step} and differ from step {step} on; which run "
                            f"is right needs --referee")
    result["lines"].insert(2, f"  found by bisection in {lookups} lookups over {result['steps_compared']} steps")
    result["lines"].append(f"  {len(diff)} leaves differ at step {step}; stage roots differ on stages "
                           f"{', '.join(map(str, stages)) or 'none'} (later differences follow from the first)")
    if leaf == "route":
        result["lines"].append("  the runs executed different routes: replay one with "
                               "schedule.routes_from=<the other run> to compare the computation itself")


def _referee(result: dict, run_a: Path, run_b: Path, la: Ledger, lb: Ledger, step: int) -> dict:
    """Replay ``step`` from the newest checkpoint before it that verifies against both ledgers."""
    replay_fn = load_replay()
    if replay_fn is None:
        result["lines"].append("referee: unavailable (skippipe.verify.replay is not installed)")
        return {"available": False}
    differ = environment_differences(la.header)
    if differ:
        result["lines"].append(f"referee: cannot replay bit for bit here (machine differs in {', '.join(differ)})")
        return {"available": True, "matches": None, "reason": f"environment differs in {', '.join(differ)}"}
    source, from_ckpt = _common_checkpoint(run_a, run_b, la, lb, step)
    from_step = 0 if from_ckpt is None else from_ckpt + 1
    replayed = replay_fn(source, from_step, step)
    missing = [s for s in range(from_step, step + 1) if s not in replayed]
    if missing:
        raise UserError(f"replay of {source} steps {from_step}..{step} returned no leaves for step {missing[0]}")
    result["replayed_steps"] = step - from_step + 1
    verdict = {"available": True, "from_checkpoint": from_ckpt, "source": str(source),
               "replayed_steps": step - from_step + 1, "matches": None}
    for s in range(from_step, step):
        if step_record(s, replayed[s])["root"] != la.root(s):
            verdict["reason"] = f"the replay does not reproduce agreed step {s}: no verdict"
            result["lines"].append(f"referee: {verdict['reason']}")
            return verdict
    root = step_record(step, replayed[step])["root"]
    matches = [str(run) for run, ledger in ((run_a, la), (run_b, lb)) if ledger.root(step) == root]
    verdict["matches"] = matches[0] if matches else None
    origin = "initialization" if from_ckpt is None else f"checkpoint {from_ckpt} of {source}"
    if matches:
        wrong = run_b if str(run_a) in matches else run_a
        verdict["wrong"] = str(wrong)
        result["lines"].append(f"referee: replayed steps {from_step}..{step} from {origin}: {matches[0]} matches the "
                               f"replay, {wrong} does not")
    else:
        wrong_leaves = diff_leaves(la.leaves(step), replayed[step])
        verdict["reason"] = "neither run matches the replay" + (f" (first leaf {wrong_leaves[0]})" if wrong_leaves else "")
        result["lines"].append(f"referee: replayed steps {from_step}..{step} from {origin}: {verdict['reason']}")
    return verdict


def _common_checkpoint(run_a: Path, run_b: Path, la: Ledger, lb: Ledger, step: int):
    """(run dir holding it, checkpoint step) of the newest checkpoint < step verifying against both ledgers."""
    candidates = sorted({(c, run) for run in (run_a, run_b) for c in list_checkpoints(run) if c < step},
                        key=lambda item: (-item[0], item[1] != run_a))
    for c, run in candidates:
        ckpt_dir = run / "ckpt" / str(c)
        if verify_checkpoint(ckpt_dir, la) is None and verify_checkpoint(ckpt_dir, lb) is None:
            return run, c
    return run_a, None


def _verify_level(run: Path) -> str:
    from skippipe.runfiles import read_config_data

    try:
        return str(read_config_data(run)["verify"]["level"])
    except Exception:  # an unreadable config is reported by the checks that need it
        return "unknown"


def _pin_operator(result: dict, run_a: Path, run_b: Path, step: int, leaf: Optional[str]) -> Dict:
    """Hook for Verde phase 2: ``skippipe.verify.ops.pin_operator(run_a, run_b, step, leaf) -> dict``."""
    from skippipe.verify.ops import pin_operator

    found = dict(pin_operator(run_a, run_b, step, leaf))
    found.setdefault("available", True)
    levels = {_verify_level(run) for run in (run_a, run_b)}
    if found.get("operator") is None and levels != {"full"}:
        found["reason"] = (f"runs recorded with verify.level={'/'.join(sorted(levels))}: operator pinning needs "
                           f"the activations and gradients hashed at verify.level=full; rerun both with verify.level=full")
    result["lines"].append("ops: " + ", ".join(f"{k}={v}" for k, v in found.items() if k != "available"))
    return found
