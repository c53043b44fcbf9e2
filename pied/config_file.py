"""``--config FILE``: a TOML file with one key per command-line flag (``/etc/pied/pied.toml``).

A key is a flag's name without its leading dashes; dashes and underscores are the same
(``max-num-seqs``, ``max_num_seqs``). Values have the flag's type: ``port = 8000``,
``enable-chunked-prefill = false``, ``model = "/srv/models/llama"``. Flags given on the command
line win over the file, and the file over the built-in defaults. An unknown key, a value of the
wrong type or invalid TOML is a :class:`~proto.config.ConfigError` that names the file and the key.

This works on any ``argparse`` parser whose options all default to None (so that "not given on
the command line" can be told apart from "given"); :func:`check_parser` asserts that.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path
from typing import Any

from proto.config import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Options that make no sense as keys: the file itself, and argparse's own.
NOT_KEYS = frozenset({"help", "config", "version"})


def key_name(name: str) -> str:
    """The canonical spelling of a key or flag: ``--max-num-seqs`` and ``max_num_seqs`` -> ``max_num_seqs``."""
    return name.lstrip("-").replace("-", "_")


def options_by_key(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option of ``parser`` under each of its spellings (``--drain-timeout`` is an alias)."""
    # NOTE: argparse has no public way to list its actions; ``_actions`` has been stable since 2.7.
    options: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_KEYS:
            continue
        for option in action.option_strings:
            if option.startswith("--") and not option.startswith("--no-"):
                options[key_name(option)] = action
    return options


def check_parser(parser: argparse.ArgumentParser) -> None:
    """Raise if an option has a default other than None (a file value could never apply to it)."""
    for key, action in options_by_key(parser).items():
        if action.default is not None:
            raise AssertionError(f"--{key.replace('_', '-')} must default to None to be settable from a file")


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file.") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}.") from None


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def convert(action: argparse.Action, key: str, value: Any, path: str | Path) -> Any:
    """``value`` as the option would have parsed it, or a ConfigError saying what was expected.
    An option of several values (``--served-model-name A B``) takes an array, or one value."""
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items and action.nargs == "+":
            raise ConfigError(f"{path}: {key} must be a non-empty array.")
        return [convert_one(action, key, item, path) for item in items]
    return convert_one(action, key, value, path)


def convert_one(action: argparse.Action, key: str, value: Any, path: str | Path) -> Any:
    """One value as the option would have parsed it."""

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{path}: {key} must be {expected}, not {_type_name(value)} ({value!r}).")

    if action.nargs == 0:  # store_true / store_false / --flag/--no-flag: a boolean in the file
        if not isinstance(value, bool):
            raise wrong("true or false")
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        return value
    converter = action.type
    if converter is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif converter is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif converter is None or converter is str:
        if not isinstance(value, str):
            raise wrong("a string")
    else:  # a custom parser function: give it the text, as the command line would
        if isinstance(value, (dict, list)):
            raise wrong("a single value")
        try:
            value = converter(str(value).lower() if isinstance(value, bool) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ConfigError(f"{path}: {key}: {error}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{path}: {key} must be one of {choices}, not {value!r}.")
    return value


def load(parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """The file's values as ``{dest: value}``, checked against ``parser``'s options."""
    document = read_toml(path)
    options = options_by_key(parser)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # dest -> the key that set it, to catch two spellings of one option
    for raw_key, value in document.items():
        key = key_name(raw_key)
        action = options.get(key)
        if action is None:
            if isinstance(value, dict):
                raise ConfigError(
                    f"{path}: [{raw_key}] is a table; pied's config has no sections, put its keys at the top level."
                )
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise ConfigError(
                f"{path}: unknown key {raw_key!r}{hint}; the keys are the flags of 'pied serve'."
            )
        if action.dest in spelled:
            raise ConfigError(f"{path}: {raw_key!r} and {spelled[action.dest]!r} set the same option.")
        spelled[action.dest] = raw_key
        values[action.dest] = convert(action, raw_key, value, path)
    return values


def apply(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str | Path) -> set[str]:
    """Fill every option of ``args`` that the command line left unset (None) from the file;
    returns the options (dests) the file set."""
    applied = set()
    for dest, value in load(parser, path).items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
            applied.add(dest)
    return applied


def blame(error: ConfigError, path: str | Path, from_file: set[str]) -> ConfigError:
    """``error`` (a message that starts with the flag, ``--max-model-len ...``) pointed at the file
    and key when the file set that value; otherwise ``error`` as it is."""
    match = re.match(r"--([a-z0-9-]+)", str(error))
    if match is None or key_name(match.group(1)) not in from_file:
        return error
    return ConfigError(f"{path}: {match.group(1)}: {str(error)[match.end():].lstrip(' :')}")
