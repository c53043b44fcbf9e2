"""One engine: the scheduler, executor and memory-manager actors are the same code whether they run
as threads (``pied.LLM``, ``pied serve --inproc``) or as worker processes (``LLM(workers=
"processes")``, ``pied serve``). So the same greedy tokens come out of all four, on every tiny model
architecture and every KV policy, with a device budget small enough that pooling must use the host.

Also the threads' lifecycle: ``LLM.shutdown()`` leaves no thread, socket or host segment behind; a
broken model folder surfaces as its ``ModelFolderError``; a worker thread that fails, stops or hangs
makes the engine dead and every request in flight gets ``EngineDeadError``, as with processes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_driver import collect, engine_threads, greedy, mapped_segments, open_memfds, running_engine
from server import REPO, ServerProcess, start_server
from tiny_models import ARCHES

import proto
from pied import LLM, SamplingParams
from pied.engine import Engine, SupervisorOptions
from pied.engine_client import EngineDeadError
from pied.supervisor import STOP_STAGES, WORKER_NAMES
from proto.config import EngineConfig
from workers.model_config import ModelFolderError

PROMPTS = [
    [1, 17, 99, 3, 250],
    [1] + list(range(40, 77)),
    [1] + [(i * 37) % 500 + 5 for i in range(70)],
    [1, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 312, 313, 314],
]
MAX_TOKENS = 8
# 256 device blocks hold the whole batch (and allocate in a blink, unlike the 1 GiB default pool).
BASE = dict(dtype="float32", block_size=4, device_kv_blocks=256)
# 24 device blocks of 4 tokens for a batch needing 42: the host tier (or recompute) takes the rest.
POLICIES = {
    "none": dict(device_kv_blocks=24),
    "swap": dict(device_kv_blocks=24, kv_policy="swap", expansion="fixed:96", host_kv_gib=0.01),
    "pie": dict(device_kv_blocks=24, kv_policy="pie", expansion="fixed:96"),
}


def flags(settings: dict) -> list[str]:
    return [part for name, value in settings.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def llm_tokens(llm: LLM) -> tuple[list[list[int]], list[str]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], params)
    return [o.outputs[0].token_ids for o in outputs], [o.outputs[0].text for o in outputs]


def http_texts(server: ServerProcess) -> list[str]:
    """The same batch as one completions request (its choices come back in prompt order)."""
    body = {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    assert all(choice["finish_reason"] == "length" for choice in choices)
    return [choice["text"] for choice in choices]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Greedy tokens per architecture with a device pool the batch fits in, no host memory."""
    results = {}
    for arch in ARCHES:
        with LLM(model=str(tiny_model_dir(arch)), **BASE) as llm:
            results[arch] = llm_tokens(llm)
    return results


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("arch", ARCHES)
def test_same_greedy_tokens_from_llm_and_serve_threads_and_processes(tiny_model_dir, reference, arch, policy):
    model = tiny_model_dir(arch)
    settings = dict(BASE, **POLICIES[policy])
    with ThreadPoolExecutor(2) as pool:
        # The servers start (other processes importing torch) while this process generates.
        starting = {
            "serve --inproc": pool.submit(start_server, model, *flags(settings), "--inproc"),
            "serve": pool.submit(start_server, model, *flags(settings)),
        }
        results = {}
        for workers in ("threads", "processes"):
            with LLM(model=str(model), workers=workers, **settings) as llm:
                results[f"LLM {workers}"] = llm_tokens(llm)
                stats = llm.engine.stats()
                if policy == "pie":
                    assert stats.host_lease == 96 and stats.bytes_to_device_total > 0, workers
                if policy == "swap":
                    assert stats.bytes_to_host_total > 0, workers
        for name, future in starting.items():
            server = future.result()
            try:
                results[name] = (None, http_texts(server))
                if policy == "pie":
                    # The scheduler's Stats (which /metrics reads) trail the tokens: poll.
                    key = 'pied:kv_bytes_transferred_total{direction="host_to_device"}'
                    deadline = time.monotonic() + 30
                    while server.metrics()[key] == 0:
                        assert time.monotonic() < deadline, name
                        time.sleep(0.05)
            finally:
                assert server.stop() == 0, name
    expected_tokens, expected_texts = reference[arch]
    for name, (tokens, texts) in results.items():
        if tokens is not None:
            assert tokens == expected_tokens, name
        assert texts == expected_texts, name


# ---------------------------------------------------------------- the threads' lifecycle


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(("socket:", "anon_inode:")):
                count += 1
        except OSError:
            pass
    return count


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_llm_shutdown_frees_every_thread_socket_and_host_segment(tiny_model_dir):
    model = tiny_model_dir("llama")
    threads_before, sockets_before, memfds_before = engine_threads(), open_sockets(), open_memfds()
    llm = LLM(model=str(model), **dict(BASE, **POLICIES["pie"]))
    assert engine_threads() != threads_before
    assert llm_tokens(llm)[0]
    assert open_memfds() > memfds_before and mapped_segments() > 0
    assert {llm.engine.worker_pids[name] for name in WORKER_NAMES} == {os.getpid()}
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert wait_for(lambda: engine_threads() == threads_before), engine_threads()
    assert open_memfds() == memfds_before and mapped_segments() == 0
    assert wait_for(lambda: open_sockets() <= sockets_before), (open_sockets(), sockets_before)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate({"prompt_token_ids": PROMPTS[0]})
    # A with block does the same.
    with LLM(model=str(model), **BASE) as llm:
        assert llm_tokens(llm)[0]
    assert wait_for(lambda: engine_threads() == threads_before), engine_threads()


def test_llm_frees_everything_at_interpreter_exit(tiny_model_dir):
    script = (
        "import sys; from pied import LLM, SamplingParams\n"
        "llm = LLM(model=sys.argv[1], dtype='float32', block_size=4, kv_policy='pie', expansion='fixed:8', device_kv_blocks=64)\n"
        "print(llm.generate({'prompt_token_ids': [1, 2, 3]}, SamplingParams(max_tokens=3))[0].outputs[0].token_ids)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = subprocess.run(
        [sys.executable, "-c", script, str(tiny_model_dir("llama"))], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("[")


def test_a_broken_weights_file_raises_its_model_folder_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    threads_before = engine_threads()
    # Raised by the executor thread while it loads, and handed to the caller as raised.
    with pytest.raises(ModelFolderError, match=weights.name):
        LLM(model=str(folder), **BASE)
    assert wait_for(lambda: engine_threads() == threads_before), engine_threads()
    # A broken config.json is reported before any worker starts.
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="config.json"):
        LLM(model=str(folder), **BASE)


def test_stop_stages_cover_every_worker():
    assert sorted(name for stage in STOP_STAGES for name in stage) == sorted(WORKER_NAMES)


# Strict where the contract is: every caller hears of a worker's death within 2 s.
FAULT_OPTIONS = SupervisorOptions(startup_timeout=120, heartbeat_interval=0.1, heartbeat_timeout=1.2, shutdown_timeout=5)


async def fail_in_flight(model: Path, fault) -> Engine:
    """Start the engine as threads, put requests in flight, apply ``fault(engine)``; every stream
    must end with EngineDeadError within 2 s. Returns the (dead, shut down) engine."""
    config = EngineConfig(model=str(model), **dict(BASE, device_kv_blocks=4096))
    engine = Engine(config, FAULT_OPTIONS, workers="threads")
    await engine.start()
    try:
        streams = [
            engine.add_request(proto.AddRequest(f"r{i}", proto.pack_i32(prompt), greedy(100_000)))
            for i, prompt in enumerate(PROMPTS)
        ]
        await asyncio.wait_for(streams[0].__aiter__().__anext__(), 30)  # generating
        fault(engine)
        faulted_at = time.monotonic()

        async def error_time(stream) -> float:
            with pytest.raises(EngineDeadError):
                await collect(stream)
            return time.monotonic() - faulted_at

        delays = await asyncio.wait_for(asyncio.gather(*(error_time(s) for s in streams)), 10)
        assert max(delays) < 2.0, delays
        assert engine.dead and not engine.healthy
        assert await asyncio.wait_for(engine.wait_dead(), 1) == engine.dead_reason
        with pytest.raises(EngineDeadError):
            engine.add_request(proto.AddRequest("late", proto.pack_i32([1]), greedy(2)))
    finally:
        await engine.shutdown()
    return engine


def failing_forward(engine: Engine) -> None:
    runner = engine.actor("executor").runner

    def execute(plan: proto.StepPlan) -> proto.StepResult:
        raise RuntimeError("forward failed on purpose")

    runner.execute = execute


async def test_a_worker_thread_that_fails_kills_the_engine(tiny_model_dir):
    engine = await fail_in_flight(tiny_model_dir("llama", max_position_embeddings=4096), failing_forward)
    assert "executor" in engine.dead_reason and "forward failed on purpose" in engine.dead_reason


async def test_a_worker_thread_that_stops_kills_the_engine(tiny_model_dir):
    engine = await fail_in_flight(
        tiny_model_dir("llama", max_position_embeddings=4096), lambda e: e.actor("scheduler").stop_threadsafe()
    )
    # Either the watchdog sees the thread end first, or the executor, sending to its closed
    # mailbox, reports that first: the reason names the scheduler either way.
    reason = engine.dead_reason
    assert "scheduler" in reason and ("stopped" in reason or "takes no messages" in reason), reason


async def test_a_worker_thread_whose_loop_hangs_kills_the_engine(tiny_model_dir):
    def wedge(engine: Engine) -> None:
        actor = engine.actor("memory")
        assert actor._loop is not None
        actor._loop.call_soon_threadsafe(time.sleep, 3.0)  # blocks its loop: no heartbeat

    engine = await fail_in_flight(tiny_model_dir("llama", max_position_embeddings=4096), wedge)
    assert "memory" in engine.dead_reason and "no heartbeat" in engine.dead_reason


async def test_threads_and_processes_report_the_same_facts(tiny_model_dir):
    model = tiny_model_dir("qwen2")
    facts = {}
    for workers in ("threads", "processes"):
        async with running_engine(model, workers=workers, **POLICIES["pie"]) as engine:
            assert engine.workers == workers
            assert engine.healthy and not engine.dead and engine.dead_reason == ""
            assert "ready" in engine.startup_progress
            info = engine.model_info
            facts[workers] = (info.num_device_blocks, info.max_host_blocks, engine.max_model_len, engine.vocab_size)
            if workers == "processes":
                with pytest.raises(RuntimeError, match="another process"):
                    engine.actor("executor")
    assert facts["threads"] == facts["processes"]
