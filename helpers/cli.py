"""What every command line of the package shares: flags built from a config dataclass, the one merge of a
`--config` file with the flags on top, and errors that print as one line a user can act on."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import get_type_hints


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass `cls`, with the field's help, choices and default.

    `--help` lists one spelling (`--flip-aug`, or the field's own flag such as a repeatable `--lora`); kohya's
    underscore spelling (`--flip_aug`) and the field's name are accepted too. Defaults are SUPPRESSed, so
    only what the user set lands in the namespace and overrides the `--config` file (`config_from_args`)."""
    hints = get_type_hints(cls)
    choices = getattr(cls, "CHOICES", {})
    for f in dataclasses.fields(cls):
        tp, flag = hints[f.name], f.metadata.get("flag")
        shown = "--" + (flag or f.name.replace("_", "-"))
        hidden = sorted({"--" + f.name, "--" + f.name.replace("_", "-")} - {shown})
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "") + (" (repeatable)" if flag and _is_list(tp) else "")
        if default not in ("", None, []) and not (tp is bool and default is False):
            help_text += f" (default: {_shown(default)})"
        kwargs = _flag_kwargs(f.name, tp, choices.get(f.name), repeatable=bool(flag) and _is_list(tp))
        parser.add_argument(shown, dest=f.name, default=argparse.SUPPRESS, help=help_text.replace("%", "%%"),
                            **kwargs)
        if hidden:
            alias = _flag_kwargs(f.name, tp, choices.get(f.name), repeatable=False)
            parser.add_argument(*hidden, dest=f.name, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **alias)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _is_list(tp) -> bool:
    return getattr(tp, "__origin__", None) is list


def _flag_kwargs(name: str, tp, choices, *, repeatable: bool) -> dict:
    """argparse keywords for a field of type `tp`: a bool becomes --x/--no-x, a list takes several values
    (or one per repetition), `None` is written as 'none'."""
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if name == "resume":  # --resume alone = the newest state; --resume PATH = that state
        return {"nargs": "?", "const": "latest", "metavar": "STATE"}
    if _is_list(tp):
        item = tp.__args__[0]
        kwargs = {"type": item, "metavar": item.__name__.upper()}
        return kwargs | ({"action": "append"} if repeatable else {"nargs": "+"})
    base = [t for t in getattr(tp, "__args__", (tp,)) if t is not type(None)][0]
    optional = type(None) in getattr(tp, "__args__", ())

    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects {base.__name__}, got {text!r}") from None

    kwargs = {"type": convert, "metavar": base.__name__.upper()}
    if choices:
        kwargs.update(choices=choices, metavar="{" + ",".join(choices) + "}")
    return kwargs


def config_from_args(cls: type, args: argparse.Namespace):
    """The config of a command: `--config FILE` (if given), then the flags the user set on top."""
    from .config import config_from_dict, load_config

    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in names}
    config = getattr(args, "config", None)
    if config:
        return dataclasses.replace(load_config(config, cls), **given)
    return config_from_dict(cls, given, source="command line")


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed subcommand; errors meant for the user print as one line and exit 2.

    Bad settings, files and models raise ValueError (ConfigError is one), FileNotFoundError,
    FileExistsError or ModelLoadError, a stopped run TrainingError, a failed write OutputWriteError,
    each with a message a user can act on. HELPERS_DEBUG=1 shows the traceback."""
    from .atomic import OutputWriteError
    from .sd.models import ModelLoadError
    from .train.errors import TrainingError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, ModelLoadError, TrainingError, OutputWriteError) as e:
        if os.environ.get("HELPERS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
