"""Shared fixtures: tiny model folders, built once per session and per distinct configuration."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is imported: without CUDA, its kernels can only
# run in the interpreter, so switch it on before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _can_inspect_non_dumpable_processes() -> bool:
    """Root with CAP_SYS_PTRACE reads any process's /proc/<pid>/fd and maps, dumpable or not."""
    try:
        with open("/proc/self/status") as status:
            effective = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return False
    return os.geteuid() == 0 and bool(effective & (1 << 19))  # CAP_SYS_PTRACE


# Workers and the daemon make themselves non-dumpable (workers/process_security.py); tests that
# count their memfds through /proc need CAP_SYS_PTRACE to read them, so without it, keep them
# dumpable (test_host_memory_security checks the real thing in its own daemon either way).
if not _can_inspect_non_dumpable_processes():
    os.environ.setdefault("PIED_DUMPABLE", "1")
from tiny_models import build_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model_dir(arch="llama", **build_model_dir kwargs)`` -> a model folder, cached per session.

    Treat the folder as read-only; copy it (``shutil.copytree``) before editing its files.
    """
    folders: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True)
        if key not in folders:
            folders[key] = build_model_dir(tmp_path_factory.mktemp(f"model-{arch}"), arch, **kwargs)
        return folders[key]

    return make


# ---------------------------------------------------------------- unit / e2e markers
#
# `e2e`: a test that starts the engine's workers, a server, a CLI or a whole model run end to end;
# `unit`: everything else (a class or a kernel driven directly). `pytest -m unit` is the fast
# subset (README, "Tests"). A module is e2e as a whole, or, in the mixed modules, a test is e2e when
# it asks for a model folder or an exporter endpoint (the engine-level tests do; the others build
# their component directly). A test may also carry `@pytest.mark.e2e` itself.
E2E_MODULES = {
    "test_actor",
    "test_adaptive",
    "test_api",
    "test_structured_api",
    "test_request_fields",
    "test_api_concurrency",
    "test_api_errors",
    "test_chat_cli",
    "test_cli_vllm",
    "test_daemon",
    "test_default_model",
    "test_engine",
    "test_engine_cycles",
    "test_prefetch_engine",
    "test_faults",
    "test_gpu_check",
    "test_hardening",
    "test_fuzz",
    "test_load",
    "test_metrics",
    "test_multinode",
    "test_responses_api",
    "test_one_engine",
    "test_pooling",
    "test_processes",
    "test_prompt_logprobs",
    "test_progress",
    "test_sdnotify",
}
MIXED_MODULES = {
    "test_async_scheduling",
    "test_graphs",
    "test_host_memory_security",
    "test_prefix_cache",
    "test_preflight",
    "test_step_deadline",
    "test_tensor_parallel",
    "test_tracing",
}
E2E_FIXTURES = {"model_dir", "llama_dir", "tiny_model_dir", "otlp_receiver"}
# Unit tests that take seconds each (whole-model logits over many parametrisations, long
# hypothesis runs): `slow`, so that `-m "unit and not slow"` stays under a minute.
SLOW_UNIT_TESTS = {
    "test_streaming.py::test_host_blocks_give_device_logits",
    "test_streaming.py::test_prefetch_is_reused_for_the_blocks_that_stay_when_others_join_or_leave",
    "test_scheduler_host.py::test_outputs_do_not_depend_on_the_kv_policy",
    "test_scheduler.py::test_outputs_do_not_depend_on_the_pool_size",
    "test_prefix_cache.py::test_outputs_with_prefix_caching_equal_the_reference",
    "test_kv_pool.py::test_runner_writes_kv_at_layer_pages",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `triton_full` tests (the whole interpreter suite, minutes on CPU) run only when asked for with
    # `-m triton_full` (or any -m expression naming it).
    run_triton_full = "triton_full" in (config.getoption("markexpr") or "")
    skip_triton_full = pytest.mark.skip(reason="the full Triton interpreter suite: run with -m triton_full")
    for item in items:
        if not run_triton_full and "triton_full" in item.keywords:
            item.add_marker(skip_triton_full)
        if item.get_closest_marker("e2e") is not None:
            continue
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if module in E2E_MODULES or (module in MIXED_MODULES and fixtures & E2E_FIXTURES):
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.unit)
            if item.nodeid.split("/")[-1].split("[")[0] in SLOW_UNIT_TESTS:
                item.add_marker(pytest.mark.slow)
