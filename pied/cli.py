"""The ``pied`` command: ``pied generate`` (offline) and ``pied serve`` (the daemon)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pied.args import add_engine_args, add_sampling_args, engine_config_from_args
from pied.bench import add_bench_command
from pied.chat import add_chat_command
from pied.serve import add_serve_command
from proto.config import ConfigError


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

    add_serve_command(commands)
    add_bench_command(commands)
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
