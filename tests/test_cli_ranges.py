"""Every count, size, limit and index of every subcommand is checked before any work, from the range
declared with its option: the walk below builds its bad command lines from those declarations."""

import argparse
import dataclasses

import pytest

from fastvae import cli
from fastvae.ranges import SEED, AvailableDevice, CommaSeparated, Range, declared_check
from fastvae.training.config import ConfigError, TrainConfig, option

from cli_helpers import error_line, run_in_process


def declared_options():
    """(command, flag, check) for every option of every subcommand that declares a check."""
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command, sub in commands.items():
        for action in sub._actions:
            check = declared_check(action.type)
            if check is not None:
                yield command, action.option_strings[0], check


CASES = [(command, flag, text) for command, flag, check in declared_options() for text in check.violations()]


def test_the_walk_covers_every_subcommand_with_numbers():
    walked = {(command, flag) for command, flag, _ in CASES}
    expected = {("sample", "--num"), ("sample", "--per-class"), ("sample", "--seed"), ("eval", "--is-samples"),
                ("eval", "--batch-size"), ("eval", "--limit"), ("eval", "--seed"), ("reconstruct", "--num"),
                ("interpolate", "--pairs"), ("interpolate", "--steps"), ("traverse", "--index"),
                ("traverse", "--steps"), ("traverse", "--span"), ("traverse", "--dims"), ("bench", "--seconds"),
                ("train", "--epochs"), ("train", "--latent-dim"), ("train", "--batch-size"), ("train", "--samples"),
                ("train", "--lr"), ("train", "--seed"), ("train", "--val-fraction"), ("train", "--max-minutes"),
                ("train", "--device"), ("train", "--nproc"), ("train", "--hidden")}
    assert expected <= walked, expected - walked


@pytest.mark.parametrize("command,flag,text", CASES)
def test_out_of_range_values_are_refused_in_one_line(command, flag, text, tmp_path):
    if command == "train":  # a value wrongly let through would train: one short epoch
        args = ["train", "--epochs", "1", "--hidden", "8", "--out", tmp_path / "run", flag, text]
    elif command in ("bench", "info", "list"):
        args = [command, flag, text]
    else:  # refused before the model is read: the model need not exist
        args = [command, tmp_path / "no-model", flag, text]
    error_line(run_in_process(*args), command, flag)
    assert not (tmp_path / "run").exists()  # before any work


def test_help_shows_each_range_with_its_default(capsys):
    code, out, _ = run_in_process("sample", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "number of samples, an integer >= 1 (default: 64)" in flat
    assert "seed of the prior draws, an integer in [-2^31, 2^31) (default: 0)" in flat
    code, out, _ = run_in_process("train", "--help")
    flat = " ".join(out.split())
    assert "latent dimensions, an integer >= 1 (default: 8)" in flat
    assert "share of the training set held out for validation, a number in [0, 1) (default: 0.1)" in flat
    code, out, _ = run_in_process("eval", "--help")
    assert " ".join(out.split()).count("evaluate only the first N examples, an integer >= 1 ") == 1  # no default


def test_values_in_range_still_parse_as_before():
    parser = cli.build_parser()
    args = parser.parse_args(["traverse", "run", "--dims", "0,3,5", "--span", "2", "--index", "0", "--steps", "2"])
    assert (args.dims, args.span, args.index, args.steps) == ([0, 3, 5], 2.0, 0, 2)
    args = parser.parse_args(["sample", "run", "--seed", "-7", "--num", "1", "--per-class", "0"])
    assert (args.seed, args.num, args.per_class) == (-7, 1, 0)
    assert parser.parse_args(["train", "--hidden", ""]).hidden == []
    assert parser.parse_args(["eval", "run"]).limit is None


def test_range_texts_and_messages():
    assert Range(ge=1, integer=True).describe() == "an integer >= 1"
    assert Range(gt=0, finite=True).describe() == "a finite number > 0"
    assert Range(ge=0, lt=1).describe() == "a number in [0, 1)"
    assert SEED.describe() == "an integer in [-2^31, 2^31)"
    assert CommaSeparated(Range(ge=0, integer=True)).describe() == "comma-separated integers >= 0"
    assert Range(ge=1, integer=True).problem(0) == "must be >= 1, got 0"
    assert Range(ge=1, integer=True).problem(2.5) == "must be an integer, got 2.5"
    assert Range(finite=True).problem(float("inf")) == "must be finite, got inf"
    assert Range(ge=0, lt=1).problem(1.0) == "must be in [0, 1), got 1.0"
    assert Range(ge=0, lt=1).problem(0.0) is None
    with pytest.raises(argparse.ArgumentTypeError, match="invalid int value: 'x'"):
        Range(integer=True)("x")
    with pytest.raises(TypeError, match="one lower bound"):
        Range(ge=0, gt=0)


def test_train_option_errors_name_the_flag_and_the_api_names_the_field(tmp_path):
    error_line(run_in_process("train", "--warmup", "-1", "--out", tmp_path / "run"), "train",
               "--warmup must be >= 0, got -1.0")
    with pytest.raises(ConfigError, match="warmup_epochs must be >= 0, got -1.0"):
        TrainConfig(warmup_epochs=-1.0).validate()
    with pytest.raises(ValueError, match="latent_dim must be an integer, got 2.5"):
        TrainConfig(latent_dim=2.5).validate()


@dataclasses.dataclass
class ExtendedConfig(TrainConfig):
    """A TrainConfig with one more field, as another part of fastvae would add one."""

    prior_components: int = option(1, "mixture components of the prior", check=Range(ge=1, integer=True))


def test_a_new_field_gets_its_check_and_its_help_by_declaring_them():
    with pytest.raises(ConfigError, match="prior_components must be >= 1, got 0"):
        ExtendedConfig(prior_components=0).validate()
    parser = argparse.ArgumentParser(formatter_class=cli.DefaultsHelpFormatter)
    cli.add_config_options(parser, ExtendedConfig)
    assert "mixture components of the prior, an integer >= 1 (default: 1)" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--prior-components", "3"]).prior_components == 3


def test_device_is_a_declared_check():
    assert isinstance(dict((f.name, f) for f in dataclasses.fields(TrainConfig))["device"].metadata["check"],
                      AvailableDevice)
