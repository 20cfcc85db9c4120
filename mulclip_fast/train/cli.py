"""The command line of ``python -m mulclip_fast.train``, generated from the fields of ``TrainConfig``.

Each field's ``Flag`` (see ``config``) says how it is spelled, grouped and parsed; leaving a flag out keeps
the field's default, or the default its ``Flag`` computes from the other settings. Three flags are not
settings of the run: ``--resume``, ``--overwrite`` and the hidden ``--stop-at-step`` (tests interrupt runs
with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..data import DataError
from ..model import CheckpointError
from .allocator import keep_freed_memory
from .config import RUN, ConfigError, Flag, TrainConfig, flag_name, flag_of
from .loop import SecondSignal, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mulclip_fast.train",
        description="Train MulCLIP (or an ablation / baseline). No arguments: a tiny model on synthetic data, CPU.",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(TrainConfig)
    for config_field in dataclasses.fields(TrainConfig):
        flag = flag_of(config_field)
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        _add_flag(groups[flag.group], config_field, flag, hints[config_field.name])
    groups[RUN].add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    groups[RUN].add_argument(
        "--overwrite", action="store_true", help="delete the earlier run in --out (checkpoints, logs) and start anew"
    )
    parser.add_argument("--stop-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _add_flag(group: argparse._ArgumentGroup, config_field: dataclasses.Field, flag: Flag, hint) -> None:
    # SUPPRESS: a flag left out is absent from the parsed namespace, so config_from_args can tell "not
    # given" (the field's default applies) from any value given.
    name = flag_name(config_field)
    if flag.keys:
        for key, key_default in flag.keys.items():
            group.add_argument(
                _keyed_flag(name, key),
                dest=_key_dest(config_field, key),
                type=type(key_default),
                metavar=flag.metavar,
                default=argparse.SUPPRESS,
                help=flag.help.format(key=key, default=key_default),
            )
        for old, key in flag.renamed_keys.items():
            group.add_argument(
                _keyed_flag(name, old),
                dest=_key_dest(config_field, key),
                type=type(flag.keys[key]),
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,  # --help shows the current names only
                action=_RenamedFlag,
                replacement=_keyed_flag(name, key),
            )
        return
    options = {"dest": config_field.name, "default": argparse.SUPPRESS, "help": _help(config_field, flag)}
    if hint is bool:
        options.update(action="store_const", const=not config_field.default)
    else:
        # A field with a parser receives the command-line strings; any other gets its own type.
        options.update(type=str if flag.parse else _scalar_type(hint), choices=flag.choices, metavar=flag.metavar)
        if flag.repeatable:
            options["action"] = "append"
        if flag.optional_value is not None:
            options.update(nargs="?", const=flag.optional_value)
    group.add_argument(name, **options)


class _RenamedFlag(argparse.Action):
    """A flag's old name: stores the value where the current flag does and says so on stderr."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _keyed_flag(name: str, key: str) -> str:
    return f"{name}-{key.replace('_', '-')}"


def _key_dest(config_field: dataclasses.Field, key: str) -> str:
    return f"{config_field.name}:{key}"


def _scalar_type(hint) -> type:
    """``int`` for ``int`` and ``int | None`` alike."""
    (value_type,) = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
    return value_type


def _help(config_field: dataclasses.Field, flag: Flag) -> str:
    default = config_field.default
    # Switches say what they do; a default computed from other settings is explained in the help itself.
    shown = flag.unset is None and default is not None and default is not dataclasses.MISSING
    return f"{flag.help} (default: {default})" if shown and not isinstance(default, bool) else flag.help


def given_settings(args: argparse.Namespace) -> dict:
    """The settings the command line gave, by field name, parsed."""
    given = vars(args)
    values = {}
    for config_field in dataclasses.fields(TrainConfig):
        flag = flag_of(config_field)
        if flag.keys:
            dests = {key: _key_dest(config_field, key) for key in flag.keys}
            keyed = {key: given[dest] for key, dest in dests.items() if dest in given}
            if keyed:
                values[config_field.name] = keyed
        elif config_field.name in given:
            value = given[config_field.name]
            values[config_field.name] = flag.parse(value) if flag.parse else value
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = given_settings(args)
    config = TrainConfig(**values)
    computed = {
        f.name: flag_of(f).unset(config)
        for f in dataclasses.fields(TrainConfig)
        if flag_of(f).unset is not None and f.name not in values
    }
    return dataclasses.replace(config, **computed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if config.device == "cpu":  # the tensors live in malloc's memory: keep it between steps
            keep_freed_memory()
        summary = train(
            config,
            resume=args.resume,
            stop_at_step=args.stop_at_step,
            overwrite=args.overwrite,
            given=set(given_settings(args)),
        )
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except SecondSignal:
        print("interrupted twice: stopped without a final checkpoint", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, where nothing waits for a checkpoint
        print(
            "interrupted during setup or the final evaluation: stopped at once; --resume continues from the "
            "newest checkpoint, if the run wrote one",
            file=sys.stderr,
        )
        return 130
    interrupted = summary["interrupted"]
    if isinstance(interrupted, int):
        return 128 + interrupted
    return 0
