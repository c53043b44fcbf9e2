"""The ``pied`` command: ``pied generate`` (offline) and ``pied serve`` (the daemon).

Exit status: 0 on success; 2 for a configuration or model-folder error, found by the preflight
before any worker starts (one line ``pied: <flag/key/file>: <what to change>``, no traceback); 1
for a failure at run time, whatever its type (a ValueError while serving is not a configuration
error). The type decides, not the moment: only ``ConfigError`` and ``ModelFolderError`` mean 2, and
the commands raise them only from their configuration phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

from pied.args import add_engine_args, add_sampling_args, engine_config_from_args
from pied.bench import add_bench_command
from pied.chat import add_chat_command
from pied.exit_status import EXIT_CONFIG_ERROR, EXIT_RUNTIME_FAILURE, RunTimeFailure, run_time
from pied.serve import add_serve_command
from proto.config import ConfigError
from workers.model_config import ModelFolderError


def cmd_generate(args: argparse.Namespace) -> int:
    import proto
    from pied.llm import LLM
    from pied.preflight import preflight

    config = preflight(engine_config_from_args(args))
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
    try:
        params.validate(config.max_logprobs)
    except ValueError as error:
        flag = "--" + getattr(error, "param", "sampling").replace("_", "-")
        raise ConfigError(f"{flag}: {error}") from None
    with run_time():
        # The checked config, plan included: LLM does not check it again.
        llm = LLM(**{field.name: getattr(config, field.name) for field in dataclasses.fields(config)})
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


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` chose: ``pied serve``'s for ``pied serve ...``."""
    while True:
        commands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, commands.dest, None) if commands is not None else None
        if commands is None or name not in commands.choices:
            return parser
        parser = commands.choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # with the command's usage line (exit 2), not pied's
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except (ConfigError, ModelFolderError) as error:
        # The preflight's messages name the flag, key or file: one line, no traceback.
        print(f"pied: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except RunTimeFailure as failure:
        cause = failure.__cause__ or failure
        traceback.print_exception(type(cause), cause, cause.__traceback__)
        print(f"pied: failed at run time: {failure}", file=sys.stderr)
        return EXIT_RUNTIME_FAILURE


if __name__ == "__main__":
    sys.exit(main())
