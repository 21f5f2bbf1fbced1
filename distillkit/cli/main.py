"""The ``distillkit`` command line.

Every user error ends as one line on stderr (``distillkit: error: ...``) and exit code 2, before
any file is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional, Sequence

import attrs

from ..errors import ConfigError, DistillkitError, UsageError, did_you_mean, exit_status
from ..threads import leave_a_core_spare


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is the one line the rest of the CLI prints too, with a "did
    you mean" for a misspelled command or flag (argparse has it only from Python 3.14)."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        choice = re.match(r"argument \w+: invalid choice: '([^']*)'", message)
        if choice and self._subcommands():
            message += did_you_mean(choice.group(1), self._subcommands())
        raise UsageError(f"{command}: {message}" if command else message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # Flags share their leading "--": a higher cutoff than for names keeps the hints relevant.
            command = self._subcommands().get(getattr(parsed, "command", None), self)
            flags = [flag for action in command._actions for flag in action.option_strings]
            hints = "".join(did_you_mean(extra.partition("=")[0], flags, n=1, cutoff=0.75) for extra in extras if extra.startswith("-"))
            self.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return parsed

    def _subcommands(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def _add_run_parser(subparsers) -> None:
    from ..config import cli_fields

    run = subparsers.add_parser(
        "run",
        help="train a method and evaluate it at several NFEs",
        description="Train a method, then sample at NFE 1, 2, 4, 8 and report quality; tracked in MLflow.",
    )
    for flag, dotted, field in cli_fields():
        run.add_argument(flag, dest=f"opt:{dotted}", default=argparse.SUPPRESS, metavar=field.name.upper(),
                         help=f"{field.metadata['help']} (default: {_show_default(field.default)})")
    run.add_argument("--config", metavar="FILE", help="TOML file with options (flags and --set override it)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="set any option by its dotted key, e.g. train.lr=1e-3 or method_options.tn=16")
    run.add_argument("--dry-run", action="store_true", help="print the resolved configuration as TOML and exit")
    run.add_argument("--resume", metavar="RUN", help="continue a run exactly: its MLflow run id, its folder name "
                     "under RUNS_DIR/runs, a checkpoint file, or auto (the latest unfinished run of this config)")
    run.add_argument("--no-track", action="store_true", help="do not log to MLflow (files still go to --runs-dir)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--export", default="", metavar="FORMAT[,FORMAT]",
                     help="when the run finishes, export its generator (torchscript, safetensors, mlflow) into "
                          "<run folder>/export; see docs/export.md")
    run.add_argument("--export-nfe", default="", metavar="K",
                     help="the NFE --export builds in (default: the smallest of --nfe)")


def _show_default(value) -> str:
    if isinstance(value, attrs.Factory):  # type: ignore[arg-type]
        return "see docs"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distillkit", description="Distil diffusion / flow-matching models into few-step samplers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    _add_run_parser(subparsers)
    plugins = subparsers.add_parser("plugins", help="list installed plugins and what each registered")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    from . import compare, evaluate, export, fid_stats, sample

    sample.add_parser(subparsers)
    export.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    compare.add_parser(subparsers)
    fid_stats.add_parser(subparsers)
    return parser


def _config_tree(args: argparse.Namespace) -> dict:
    from ..config import load_toml, nested_set, parse_literal
    from ..errors import ConfigError

    tree: dict = load_toml(args.config) if args.config else {}
    for key, value in vars(args).items():
        if key.startswith("opt:"):
            nested_set(tree, key[4:], value)
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", item, "KEY=VALUE, e.g. train.lr=1e-3")
        nested_set(tree, key.strip(), parse_literal(value.strip()))
    return tree


def cmd_plugins(args: argparse.Namespace) -> int:
    from ..plugin_manager import plugin_state

    state = plugin_state()
    infos = [info.to_json() for info in sorted(state.plugins.values(), key=lambda i: i.name)]
    if args.json:
        print(json.dumps({"plugins": infos, **state.catalogue()}, indent=2))
        return 0
    for info in infos:
        dist = f"{info['distribution']} {info['version']}" if info["distribution"] else "not from a distribution"
        print(f"{info['name']}  ({dist})")
        for kind, names in sorted(info["registered"].items()):
            print(f"    {kind}: {', '.join(names)}")
        for error in info["errors"]:
            print(f"    ERROR: {error}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run_command

    return run_command(args, _config_tree(args))


def _with_flag(exc: ConfigError) -> str:
    """Name the flag the user typed, when the option has one, next to its dotted key."""
    from ..config import cli_fields

    flags = {dotted: flag for flag, dotted, _ in cli_fields()}
    if exc.option in flags:
        flag = flags[exc.option]
        key = "" if flag[2:].replace("-", "_") == exc.option else f" (config key {exc.option})"
        return f"{flag}={exc.value!r}{key} is not allowed: {exc.allowed}"
    return str(exc)


def _warn_about_broken_plugins() -> None:
    """Every command shows the plugins that failed to load (``distillkit plugins`` in full): a
    name a user expects may be missing, or taken by a built-in, because of one."""
    from ..plugin_manager import plugin_state

    for name, errors in sorted(plugin_state().errors.items()):
        for error in errors:
            print(f"distillkit: warning: plugin {name!r}: {error}", file=sys.stderr)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "plugins":
        return cmd_plugins(args)
    _warn_about_broken_plugins()
    leave_a_core_spare()  # before any torch work; OMP_NUM_THREADS wins (distillkit/threads.py)
    if args.command in ("sample", "eval", "compare", "fid-stats", "export"):
        from . import compare, evaluate, export, fid_stats, sample

        commands = {"sample": sample, "eval": evaluate, "compare": compare, "fid-stats": fid_stats,
                    "export": export}
        return commands[args.command].command(args)
    return cmd_run(args)


def _stdout_closed() -> int:
    """The reader of our output went away (``distillkit plugins | head -3``): stop quietly, as a
    command killed by SIGPIPE does, instead of a BrokenPipeError traceback at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the final flush at exit must not fail again
    return 141  # 128 + SIGPIPE, what a shell reports for a command the pipe killed


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe is found here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except ConfigError as exc:
        print(f"distillkit: error: {_with_flag(exc)}", file=sys.stderr)
        return 2
    except DistillkitError as exc:  # bad input (exit code 2) or a run that failed (1)
        print(f"distillkit: error: {exc}", file=sys.stderr)
        return exit_status(exc)
    except KeyboardInterrupt:
        print("distillkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
