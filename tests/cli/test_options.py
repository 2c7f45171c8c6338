"""Every command-line flag is made from one field of its command's options dataclass
(:mod:`lp_fx.tools.options`): its name, default and help are the field's, and no flag is declared
anywhere else."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from lp_fx.tools import cli
from lp_fx.tools.cli.bench import BenchArgs
from lp_fx.tools.cli.eval import EvalArgs
from lp_fx.tools.cli.export import ExportArgs
from lp_fx.tools.cli.finetune import FinetuneArgs
from lp_fx.tools.cli.frontier import FrontierArgs
from lp_fx.tools.cli.gpu_check import GpuCheckArgs
from lp_fx.tools.cli.llamacpp_check import CheckArgs, build_parser
from lp_fx.tools.cli.plan import PlanArgs
from lp_fx.tools.cli.sweep import SweepArgs
from lp_fx.tools.evaluation.options import TaskOptions
from lp_fx.tools.frontier.options import FrontierOptions
from lp_fx.tools.options import add_options, docstrings, flag_defaults, flag_fields, option, options_from, positive_int
from lp_fx.tools.planning import search
from lp_fx.tools.planning.options import SearchOptions

COMMANDS = {"eval": EvalArgs, "sweep": SweepArgs, "plan": PlanArgs, "finetune": FinetuneArgs, "bench": BenchArgs,
            "export": ExportArgs, "frontier": FrontierArgs, "gpu-check": GpuCheckArgs}


def _subparser(command: str) -> argparse.ArgumentParser:
    actions = cli.build_parser()._subparsers._group_actions[0]
    return actions.choices[command]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions if not isinstance(action, argparse._HelpAction)}


@pytest.mark.parametrize("command", sorted(COMMANDS) + ["llamacpp_check"])
def test_every_flag_is_one_field_with_its_default_and_help(command):
    cls = CheckArgs if command == "llamacpp_check" else COMMANDS[command]
    flags = _flags(build_parser() if command == "llamacpp_check" else _subparser(command))
    declared = {name: help_text for _, help_text, name in flag_fields(cls)}
    assert set(flags) - {"func"} == set(declared)
    defaults = flag_defaults(cls)
    for name, action in flags.items():
        if name != "func":
            assert (action.default, action.help) == (defaults[name], declared[name]), name
            assert declared[name], f"{command} --{name} has no docstring"


def test_the_planner_options_are_declared_once_for_plan_frontier_and_make_plan():
    plan, frontier = flag_defaults(PlanArgs), flag_defaults(FrontierArgs)
    for name in ("calib_windows", "screen_windows", "refine", "passes", "race_margin"):
        assert plan[name] == frontier[name] == getattr(SearchOptions, name)
    assert plan["modes"] == frontier["plan_modes"] == SearchOptions.modes
    assert search.make_plan.__defaults__[2:5] == (SearchOptions.modes, SearchOptions.refine, SearchOptions.passes)
    assert FrontierOptions.defaults_json()["plan_modes"] == list(SearchOptions.modes)


def test_an_embedding_gives_its_own_defaults_and_options_from_reads_them_back():
    args = _subparser("frontier").parse_args(["--plan-modes", "block", "--no-race", "--limit", "7"])
    assert options_from(SearchOptions, args, {"modes": "plan_modes"}) == SearchOptions(modes=("block",), no_race=True)
    assert options_from(TaskOptions, args).limit == 7
    assert flag_defaults(FrontierArgs)["limit"] == 500 and flag_defaults(EvalArgs)["limit"] is None


def test_a_value_check_refuses_in_one_line_before_anything_runs(capsys):
    @dataclass(frozen=True)
    class Options:
        count: int = option(1, parse=positive_int)
        """how many"""

    parser = cli.OneLineParser(prog="x")
    add_options(parser, Options)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--count", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["x: error: argument --count: 0 is not valid; give an integer >= 1 (see x --help)"]
    assert docstrings(Options) == {"count": "how many"}
