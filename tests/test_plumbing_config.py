"""plumbing.config.ConfigParser: YAML values go through the flags' own type conversion; every toy config parses."""

from pathlib import Path

import pytest

from plumbing.config import ConfigParser
from toy.config import ProcessConfig, TrainConfig
from toy.model import ToyModelConfig

REPO = Path(__file__).resolve().parents[1]
TYPES = (ProcessConfig, ToyModelConfig, TrainConfig)


def parse(tmp_path, text: str, *flags: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    return ConfigParser(TYPES).parse_args_and_config(["--config", str(cfg), *flags])


def test_yaml_values_are_converted_like_flags(tmp_path):
    _, _, train = parse(tmp_path, "learning_rate: 5e-2\nmax_steps: 7\ndisable_tqdm: true\n")
    assert type(train.learning_rate) is float and train.learning_rate == 0.05  # YAML reads 5e-2 as a string
    assert type(train.max_steps) is int and train.max_steps == 7 and train.disable_tqdm is True
    _, _, train = parse(tmp_path, "max_grad_norm: 1\n")
    assert type(train.max_grad_norm) is float  # an int in YAML for a float field arrives as the flag would
    _, _, train = parse(tmp_path, "learning_rate: 5e-2\n", "--learning_rate", "0.25")
    assert train.learning_rate == 0.25  # flags still win over the file


def test_yaml_values_a_flag_would_refuse_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"config key 'max_steps': 2\.5 is not a valid int"):
        parse(tmp_path, "max_steps: 2.5\n")
    with pytest.raises(ValueError, match=r"config key 'learning_rate': 'fast' is not a valid float"):
        parse(tmp_path, "learning_rate: fast\n")
    with pytest.raises(ValueError, match=r"config key 'optim': 'adam' is not one of"):
        parse(tmp_path, "optim: adam\n")
    with pytest.raises(ValueError, match=r"Unknown arguments from config file: \['--stepz'"):
        parse(tmp_path, "stepz: 3\n")


def test_yaml_lists_and_mappings_are_converted_per_element(tmp_path):
    from toy.experiments.factored import FactoredConfig

    cfg = tmp_path / "f.yaml"
    cfg.write_text("rhos: [0, '0.5']\nprocesses: {k2: {name: mess3}}\n")
    (factored,) = ConfigParser((FactoredConfig,)).parse_args_and_config(["--config", str(cfg)])
    assert factored.rhos == [0.0, 0.5] and all(type(r) is float for r in factored.rhos)
    assert factored.processes == {"k2": {"name": "mess3"}}
    cfg.write_text("rhos: 0.5\n")
    with pytest.raises(ValueError, match="expected a list"):
        ConfigParser((FactoredConfig,)).parse_args_and_config(["--config", str(cfg)])


ENTRY_POINTS = {
    "pipeline": ["mess3", "mess3_gpu", "rrxor"],
    "pretrain": [
        "rl_pretrain_gates",
        "rl_pretrain_headroom",
        "rl_pretrain_mess3_rrxor",
        "rl_pretrain_rare",
        "rl_pretrain_segments",
    ],
    "factored": ["factored"],
    "factor_steering": ["factor_steering"],
    "toy_em": ["toy_em"],
    "em_chain": ["em_chain", "em_chain_subsets", "em_chain_factor", "em_chain_factor_matched"],
    "steering_knob": ["factor_steering_knob"],
    "rl": ["rl_compose", "rl_gates", "rl_headroom", "rl_rare", "rl_reweight", "rl_segments"],
    "rl_objectives": ["rl_compose"],
    "ladder": ["rl_compose", "rl_segments"],
    "reweighting": ["rl_compose", "rl_segments", "rl_reweight", "rl_gates"],
}


def test_every_toy_config_parses_with_its_entry_point():
    import importlib

    covered = set()
    for module, names in ENTRY_POINTS.items():
        for name in names:  # a fresh parser per config: TrlParser keeps a parsed YAML's values as its defaults
            importlib.import_module(f"toy.experiments.{module}").make_parser().parse_args_and_config(
                ["--config", str(REPO / f"configs/toy/{name}.yaml")]
            )
            covered.add(name)
    from plumbing.config import ConfigParser
    from toy.ladder import LadderConfig

    ConfigParser((LadderConfig,)).parse_args_and_config(
        ["--config", str(REPO / "configs/toy/detector_thresholds.yaml")]
    )
    covered.add("detector_thresholds")  # the ladder's thresholds, read by toy.experiments.ladder --thresholds
    assert covered == {p.stem for p in (REPO / "configs/toy").glob("*.yaml")}  # a new config gets an entry here
