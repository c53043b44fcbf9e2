"""The ``pied`` command: ``pied generate`` (offline) and ``pied serve`` (the daemon)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from pied.chat import add_chat_command
from pied.config import ConfigError, EngineConfig

# Flags that are not engine configuration (set elsewhere or internal).
_HIDDEN_FIELDS = {"extra"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per EngineConfig field, named like vLLM's (``max_num_seqs`` -> ``--max-num-seqs``)."""
    group = parser.add_argument_group("engine")
    hints = typing.get_type_hints(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        if field.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            group.add_argument(flag, dest=field.name, type=base, default=None, metavar=field.name.upper())


def engine_config_from_args(args: argparse.Namespace, **defaults) -> EngineConfig:
    values = dict(defaults)
    for name in EngineConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return EngineConfig(**values).validate()


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def cmd_generate(args: argparse.Namespace) -> int:
    import proto
    from pied.llm import LLM

    config = engine_config_from_args(args)
    params = proto.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sampling_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    llm = LLM(**dataclasses.asdict(config))
    prompts = args.prompt or ["def fibonacci(n):"]
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        choice = output.outputs[0]
        print(f"{prompt}{choice.text}")
        print(f"[{len(choice.token_ids)} tokens, finish_reason={choice.finish_reason}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pied import __version__

    parser = argparse.ArgumentParser(prog="pied", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pied {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate text offline, in this process")
    generate.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    add_engine_args(generate)
    add_sampling_args(generate)
    generate.set_defaults(handler=cmd_generate)
    add_chat_command(commands)

    try:
        from pied.serve import add_serve_command
    except ImportError:
        pass
    else:
        add_serve_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"pied: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        # Model folder and tokenizer errors name the file and what is wrong.
        print(f"pied: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
