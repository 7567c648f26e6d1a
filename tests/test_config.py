import pytest

from skippipe.cli import main
from skippipe.config import load_config, stages_visited, to_yaml
from skippipe.errors import ConfigError


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.steps=7", "schedule.partition_sizes=[2,1,1]", "run.seed=5"])
    assert cfg.train.steps == 7
    assert list(cfg.schedule.partition_sizes) == [2, 1, 1]
    assert cfg.run.seed == 5
    assert cfg.run.name == "default"


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  steps: 3\n  lr: 0.5\n")
    cfg = load_config(str(path), ["train.lr=0.25"])
    assert (cfg.train.steps, cfg.train.lr, cfg.run.name) == (3, 0.25, "exp")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=9"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)).train.steps == 9


@pytest.mark.parametrize("overrides, words", [
    (["bogus.key=1"], ["unknown config key 'bogus.key'"]),
    (["train.stepz=1"], ["unknown config key 'train.stepz'", "train.steps"]),
    (["train.steps=abc"], ["train.steps"]),
    (["schedule.method=magic"], ["schedule.method", "skippipe"]),
    (["schedule.num_stages=9"], ["9 stages > model.n_layers=8"]),
    (["schedule.skip_ratio=0.8"], ["schedule.skip_ratio=0.8 leaves 1 of 4", "lower schedule.skip_ratio"]),
    (["schedule.microbatches_per_originator=0"], ["schedule.microbatches_per_originator=0 must be >= 1",
                                                   "every stage-0 node starts at least one"]),
    (["train.samples_per_microbatch=0"], ["train.samples_per_microbatch"]),
    (["data.source=files", "data.path=/no/such/file.txt"], ["data.path", "/no/such/file.txt", "does not exist"]),
    (["topology.file=/no/such.yaml"], ["topology.file", "/no/such.yaml"]),
    (["fault.kill.step=3"], ["fault.kill needs both step and node"]),
    (["launcher=slurm"], ["launcher", "inprocess"]),
    (["fault.slow_links.n0-n9=10"], ["fault.slow_links.n0-n9", "two node names", "nodes are n0"]),
    (["fault.slow_links.n0-n1=-2"], ["fault.slow_links.n0-n1=-2", "must be a number > 0"]),
    (["fault.slow_links.n0-n1=10", "cost.emulate_links=false"], ["fault.slow_links", "cost.emulate_links=true"]),
    (["fault.slow_links_from=-1"], ["fault.slow_links_from=-1 must be a step >= 0"]),
    (["train.eval_every=-2"], ["train.eval_every=-2 must be >= 0", "0: validate only at the end"]),
    (["run.log_level=loud"], ["run.log_level", "warning"]),
    (["runtime.backend=mpi"], ["runtime.backend='mpi'", "gloo"]),
    (["ray.placement_strategy=spread"], ["ray.placement_strategy", "SPREAD"]),
    (["fault.kill.step=1", "fault.kill.node=n2"], ["fault.kill inject faults", "launcher=local"]),
    (["fault.slow_nodes.n1=3", "launcher=inprocess"], ["fault.slow_nodes", "launcher=inprocess has none"]),
    (["checkpoint.every=2", "verify.level=off"], ["checkpoint.every=2 needs the ledger", "verify.level=states"]),
])
def test_bad_values_name_key_and_fix(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# one value out of range for every key of config._RANGES (a new key needs a case here)
OUT_OF_RANGE = {
    "model.init_std": 0, "model.norm_eps": -1e-6, "model.rope_theta": 0, "data.bpe_vocab_size": 0,
    "data.max_corpus_mb": 0, "train.min_lr_ratio": 1.5, "train.warmup_steps": -1, "train.lr_steps": 0,
    "train.weight_decay": -0.1, "train.beta1": 1.0, "train.beta2": -0.5, "train.eps": 0, "train.grad_clip": "nan",
    "train.eval_batches": 0, "schedule.max_swaps": -1, "schedule.max_swap_distance": -1, "schedule.max_jump": 0,
    "schedule.replan_every": -3, "schedule.search_budget_s": 0, "schedule.allocation_budget_s": -1,
    "cost.fwd_s_per_sample_layer": -0.01, "cost.flops_per_s": 0, "cost.bwd_factor": -1, "cost.loss_factor": "inf",
    "cost.message_overhead_s": -0.35, "cost.bytes_per_element": 0, "cost.measured_ewma": 1.5,
    "tracking.log_every": 0, "checkpoint.every": -1, "checkpoint.keep": 0, "fault.slow_threshold": 1.0,
    "runtime.master_port": 70000, "ray.num_cpus_per_worker": 0, "train.lr": "nan", "train.steps": -1,
    "train.eval_every": -2, "train.samples_per_microbatch": 0, "train.loss_scale": 0, "train.loss_scale_window": 0,
    "data.val_fraction": 1.0, "schedule.microbatches_per_originator": 0, "schedule.memory": 0,
    "runtime.timeout_s": 0, "fault.heartbeat_s": -1, "fault.probe_after": -1, "fault.slow_until": -2,
}


def test_out_of_range_numbers_name_the_key_the_range_and_the_default():
    from skippipe.config import _RANGES

    assert set(OUT_OF_RANGE) == set(_RANGES)
    for key, bad in OUT_OF_RANGE.items():
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}={bad}"])
        message = str(err.value)
        assert message.startswith(f"{key}=") and "must be" in message and "the default is" in message, message
    # the edges that are allowed
    load_config(None, ["train.grad_clip=0", "train.min_lr_ratio=1", "schedule.max_swaps=0", "cost.bwd_factor=0",
                       "train.lr_steps=null", "runtime.master_port=65535", "schedule.memory=null",
                       "fault.slow_until=null", "fault.probe_after=0", "train.eval_every=0", "train.steps=0"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file 'nope.yaml' does not exist"):
        load_config("nope.yaml")


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.stepz'"):
        load_config(str(path))


def test_cli_exits_2_with_one_line(capsys):
    assert main(["train", "configs/tiny.yaml", "bogus.key=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bogus.key" in err and len(err.splitlines()) == 1


def test_cli_bad_argument_exits_2(capsys):
    assert main(["train", "--no-such-flag"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("num_stages, ratio, visited", [(6, 0.33, 4), (8, 0.25, 6), (4, 0.25, 3), (8, 0.5, 4),
                                                        (4, 0.0, 4)])
def test_stages_visited(num_stages, ratio, visited):
    assert stages_visited(num_stages, ratio) == visited


def test_a_first_argument_without_equals_is_the_config_file():
    from skippipe.config import split_config_arg

    assert split_config_arg(["configs/tiny.yaml", "a=1"]) == ("configs/tiny.yaml", ["a=1"])
    assert split_config_arg(["a=1", "b=2"]) == (None, ["a=1", "b=2"])
    assert split_config_arg([]) == (None, [])


@pytest.mark.parametrize("argv, words", [
    (["plan", "{dir}"], "config file '{dir}' is a directory, not a file"),
    (["plan", "configs/tiny.yaml", "topology.file={dir}"], "topology.file '{dir}' is a directory, not a file"),
    (["simulate", "{dir}"], "plan file '{dir}' is a directory, not a file"),
    (["plot", "{file}"], "run directory '{file}' is a file, not a directory"),
    (["verify", "{file}"], "run directory '{file}' is a file, not a directory"),
])
def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path, capsys, argv, words):
    file = tmp_path / "a.txt"
    file.write_text("x")
    fill = {"dir": str(tmp_path), "file": str(file)}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words.format(**fill) in err and len(err.splitlines()) == 1, err
