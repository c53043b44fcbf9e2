"""The test-only copy throttle: fixed from the config or the environment, or re-read from a file."""

from __future__ import annotations

import os

import pytest

from proto.config import ConfigError, EngineConfig
from workers.executor.copy_throttle import COPY_THROTTLE_ENV, COPY_THROTTLE_FILE_ENV, CopyThrottle


def test_a_file_is_read_again_only_when_it_changes(tmp_path) -> None:
    path = tmp_path / "throttle"
    throttle = CopyThrottle(path=path)  # absent: no throttle
    assert throttle.bytes_per_s is None and not throttle.poll()
    path.write_text("2e6")
    assert throttle.poll() and throttle.bytes_per_s == 2e6
    assert not throttle.poll()  # unchanged
    staged = tmp_path / "next"
    staged.write_text("5e5\n")
    os.replace(staged, path)  # as a benchmark writes it
    assert throttle.poll() and throttle.bytes_per_s == 5e5
    path.unlink()
    assert throttle.poll() and throttle.bytes_per_s is None


@pytest.mark.parametrize("text", ["fast", "0", "-1", "inf", "nan"])
def test_a_bad_value_names_where_it_came_from(tmp_path, text: str) -> None:
    path = tmp_path / "throttle"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: the copy throttle must be a positive number"):
        CopyThrottle(path=path)


def test_from_config_and_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(COPY_THROTTLE_ENV, raising=False)
    monkeypatch.delenv(COPY_THROTTLE_FILE_ENV, raising=False)
    config = EngineConfig(model="m", extra={"copy_throttle_bytes_per_s": 3e6})
    assert CopyThrottle.from_config(config).bytes_per_s == 3e6
    path = tmp_path / "throttle"
    path.write_text("1e6")
    monkeypatch.setenv(COPY_THROTTLE_FILE_ENV, str(path))
    throttle = CopyThrottle.from_config(EngineConfig(model="m"))
    assert throttle.bytes_per_s == 1e6 and throttle.path == path
    monkeypatch.delenv(COPY_THROTTLE_FILE_ENV)
    assert CopyThrottle.from_config(EngineConfig(model="m")).bytes_per_s is None


def test_a_rank_reads_its_own_file(tmp_path, monkeypatch) -> None:
    # Under tensor parallelism "{rank}" names each rank's file: one rank's link can be cut alone.
    monkeypatch.delenv(COPY_THROTTLE_ENV, raising=False)
    (tmp_path / "throttle-1").write_text("2e6")
    config = EngineConfig(model="m", extra={"copy_throttle_file": str(tmp_path / "throttle-{rank}")})
    assert CopyThrottle.from_config(config, rank=0).bytes_per_s is None  # no file for rank 0
    rank_1 = CopyThrottle.from_config(config, rank=1)
    assert rank_1.bytes_per_s == 2e6 and rank_1.path == tmp_path / "throttle-1"
