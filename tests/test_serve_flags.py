"""``pied serve``'s numeric flags, from their one table (``pied.serve.NUMERIC_FLAGS``): each is a
ServeOptions field and a ``--config`` key, its bound is checked with a message naming the flag, and
the request limits are RequestLimits field for field."""

from __future__ import annotations

import dataclasses

import pytest

from pied.api.params import RequestLimits
from pied.cli import build_parser
from pied.serve import NUMERIC_FLAGS, REQUEST_LIMIT_FLAGS, ServeOptions
from proto.config import ConfigError


def options(*argv: str) -> ServeOptions:
    return ServeOptions.from_args(build_parser().parse_args(["serve", *argv])).validate()


def test_every_flag_is_an_option_field_and_limits_are_request_limits():
    fields = {field.name for field in dataclasses.fields(ServeOptions)}
    assert {row.key for row in NUMERIC_FLAGS} <= fields
    assert [row.key for row in REQUEST_LIMIT_FLAGS] == [
        "max_n", "max_choices", "max_output_tokens", "max_prompt_tokens", "max_prompts", "max_messages",
        "max_stop_token_ids", "max_stop_strings", "max_stop_string_chars",
    ]  # fmt: skip
    assert {row.key for row in REQUEST_LIMIT_FLAGS} == {f.name for f in dataclasses.fields(RequestLimits)}
    # The option's defaults are RequestLimits' own.
    assert options().request_limits() == RequestLimits()
    limits = options("--max-n", "3", "--max-prompt-tokens", "100").request_limits()
    assert limits.max_n == 3 and limits.max_prompt_tokens == 100 and limits.max_prompts == 256


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "65536"], "--port must be in [0, 65535], got 65536."),
        (["--port", "-1"], "--port must be in [0, 65535], got -1."),
        (["--max-queued-requests", "-1"], "--max-queued-requests must be at least 0, got -1."),
        (["--max-request-body-bytes", "1023"], "--max-request-body-bytes must be at least 1024, got 1023."),
        (["--max-admitted-requests", "0"], "--max-admitted-requests must be at least 1, got 0."),
        (["--max-connections", "0"], "--max-connections must be at least 1, got 0."),
        (["--keep-alive-timeout", "0"], "--keep-alive-timeout must be positive, got 0.0."),
        (["--body-timeout", "-2"], "--body-timeout must be positive, got -2.0."),
        (["--write-timeout", "0"], "--write-timeout must be positive, got 0.0."),
        (["--drain-timeout", "-1"], "--shutdown-timeout must be non-negative, got -1.0."),
        (["--startup-timeout", "0"], "--startup-timeout must be positive, got 0.0."),
        (["--heartbeat-timeout", "0.5"], "--heartbeat-timeout must be at least 1 second, got 0.5."),
        (["--max-n", "0"], "--max-n must be at least 1, got 0."),
        (["--max-output-tokens", "0"], "--max-output-tokens must be at least 1, got 0."),
        (["--max-stop-string-chars", "-5"], "--max-stop-string-chars must be at least 1, got -5."),
    ],
)
def test_a_value_past_its_bound_is_refused_by_name(argv, message):
    with pytest.raises(ConfigError) as error:
        options(*argv)
    assert str(error.value) == message


def test_values_on_the_bounds_are_accepted():
    given = options(
        "--port", "0", "--max-queued-requests", "0", "--max-request-body-bytes", "1024",
        "--max-connections", "1", "--shutdown-timeout", "0", "--heartbeat-timeout", "1",
        "--keep-alive-timeout", "0.01", "--max-n", "1",
    )  # fmt: skip
    assert given.port == 0 and given.max_queued_requests == 0 and given.shutdown_timeout == 0.0
    assert given.heartbeat_timeout == 1.0 and given.keep_alive_timeout == 0.01 and given.max_n == 1
    assert options("--port", "65535").port == 65535


def test_help_shows_each_default():
    help_text = " ".join(build_parser().parse_args(["serve"]).handler.keywords["parser"].format_help().split())
    assert "(default: 8000)" in help_text and "--drain-timeout" in help_text
    assert f"larger request bodies (default: {ServeOptions().max_request_body_bytes})" in help_text
    assert "load the model (default: 600)" in help_text and "the largest n (default: 128)" in help_text


def test_an_unknown_flag_gets_the_commands_usage() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "pied", "serve", "--swap-space=4"], capture_output=True, text=True, timeout=60
    )
    # vLLM's --swap-space is not pied's: exit 2, under `pied serve`'s usage, not `pied`'s.
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: pied serve ") and result.stderr.strip().splitlines()[-1] == (
        "pied serve: error: unrecognized arguments: --swap-space=4"
    )
