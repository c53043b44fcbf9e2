"""Tensor parallelism across machines (``--nnodes 2``), on one machine: two ``pied serve`` processes on
127.0.0.1, node 0 (the head: API, scheduler, memory manager, rank 0) and node 1 (rank 1), over gloo.

- greedy tokens equal one rank's with ``none``, ``swap`` and ``pie`` at a tiny device budget (rank 1
  keeps its part of every host segment itself: its KV must come back from it);
- kill -9 of node 1, or a hung rank on it (SIGSTOP), fails every caller with a 503 and the head
  exits non-zero (and stops node 1, status 1); kill -9 of the head makes node 1 exit non-zero; a SIGTERM to the head stops both with status 0; nothing is left
  behind (no process, no runtime directory);
- inconsistent flags are refused with exit 2 (node rank out of range, a size that does not split
  over the nodes, no rendezvous address, a second node 1).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from daemon import live_pids, shm_entries, wait_gone
from server import REPO, EventStream, ServerProcess, start_server
from test_preflight import assert_refused

import proto
from pied.llm import LLM
from pied.multinode import head_endpoint, ignored_settings, node_config, node_ranks
from pied.preflight import preflight
from proto.config import ConfigError, EngineConfig
from workers.executor.local_segments import LocalSegments
from workers.memory.host_pool import SEALS, HostSegment, KVLayout

PROMPTS = [[1, 17, 99, 3, 250], [1] + list(range(40, 77)), [1] + [(i * 11) % 400 + 20 for i in range(23)]]
MAX_TOKENS = 10
# 16 blocks of 4 tokens do not hold the three requests at once: they are preempted (none), swapped
# (swap) or served from host blocks (pie).
TIGHT = ["--dtype", "float32", "--block-size", "4", "--device-kv-blocks", "16"]
POLICIES = {
    "none": TIGHT,
    "swap": [*TIGHT, "--kv-policy", "swap", "--expansion", "fixed:48", "--host-kv-gib", "0.01"],
    "pie": [*TIGHT, "--kv-policy", "pie", "--expansion", "fixed:48"],
}


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def reference(model) -> list[str]:
    """One rank's greedy completions (threads, a device pool that holds everything)."""
    greedy = proto.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with LLM(str(model), dtype="float32", device_kv_blocks=256) as llm:
        outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in PROMPTS], greedy)
    return [output.outputs[0].text for output in outputs]


def free_base_port(count: int) -> int:
    """A port P with P .. P + count - 1 all free on 127.0.0.1 (the rendezvous and pied's ports)."""
    for _ in range(200):
        base = random.randrange(20000, 60000)
        sockets = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                sockets.append(probe)
                probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for probe in sockets:
                probe.close()
    raise RuntimeError(f"no {count} consecutive free ports")


class Node:
    """``pied serve --node-rank 1`` in its own process group, its output in a log file."""

    def __init__(self, model: Path, flags: list[str], runtime: Path, log: Path) -> None:
        runtime.mkdir(exist_ok=True)
        self.runtime = runtime
        self.log_path = log
        with open(log, "w") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pied", "serve", "--model", str(model), *flags],
                cwd=REPO,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "XDG_RUNTIME_DIR": str(runtime)},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node 1 still runs after {timeout} s:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def node_flags(port: int, node_rank: int) -> list[str]:
    return [
        "--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", str(node_rank),
        "--distributed-init-method", f"tcp://127.0.0.1:{port}",
    ]  # fmt: skip


@contextlib.contextmanager
def two_nodes(model: Path, tmp_path: Path, flags: list[str]) -> Iterator[tuple[ServerProcess, Node]]:
    """The head (its API on a free port) and node 1; both stopped (and their groups killed) after."""
    port = free_base_port(7)  # the store, the link, three mailboxes, rank 1's mailbox
    # API flags given to node 1 are accepted and ignored (as vLLM's headless nodes do).
    node = Node(model, [*flags, *node_flags(port, 1), "--port", "1"], tmp_path / "node-run", tmp_path / "node.log")
    head_runtime = tmp_path / "head-run"
    head_runtime.mkdir()
    try:
        with mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": str(head_runtime)}):
            head = start_server(model, *flags, *node_flags(port, 0))
        head.runtime = head_runtime  # type: ignore[attr-defined]
        try:
            yield head, node
        finally:
            head.stop()
    finally:
        node.stop()


def completions(server: ServerProcess) -> list[str]:
    """The prompts' greedy completions, in one request: they arrive together, and do not fit the
    device's 16 blocks together."""
    body = {"prompt": PROMPTS, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    response = server.request("POST", "/v1/completions", body)
    assert response.status == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    return [choice["text"] for choice in choices]


def group_pids(leader: int) -> list[int]:
    """Live processes of ``leader``'s process group (a daemon and its workers)."""
    pids = []
    for pid in live_pids():
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == leader:
                pids.append(pid)
    return pids


def test_pie_on_two_nodes_then_node_1_is_killed(model, reference, tmp_path):
    shm_before = shm_entries()
    with two_nodes(model, tmp_path, POLICIES["pie"]) as (head, node):
        assert completions(head) == reference
        assert "ignored here: --port" in node.log()
        # Host blocks were streamed (rank 0's count; rank 1's are in the tokens).
        deadline = time.monotonic() + 30
        while head.metrics().get('pied:kv_bytes_transferred_total{direction="host_to_device"}', 0) <= 0:
            assert time.monotonic() < deadline, "no host block was streamed"
            time.sleep(0.1)
        head_workers = [pid for pid in group_pids(head.process.pid) if pid != head.process.pid]
        node_workers = [pid for pid in group_pids(node.process.pid) if pid != node.process.pid]
        assert head_workers and node_workers
        # Within the model length (the 64 blocks of device and host pool): long enough to be cut short.
        body = {"prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        streams = [EventStream(head, "/v1/completions", body, timeout=30) for _ in range(2)]
        for stream in streams:
            assert stream.next_event()["choices"]  # generating
        killed = time.monotonic()
        os.kill(node.process.pid, signal.SIGKILL)
        for stream in streams:
            events = stream.rest()  # ends with an error (the 30 s read timeout would fail the test)
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-3:]
        print(f"every caller failed {time.monotonic() - killed:.2f} s after node 1 was killed")
        assert head.process.wait(60) != 0
        assert "node 1" in head.log()
        assert wait_gone(head_workers + node_workers, 30) == []  # rank 1 follows its node (parent pipe)
        assert list(head.runtime.iterdir()) == []  # type: ignore[attr-defined]
    assert shm_entries() <= shm_before


def test_none_on_two_nodes_then_the_head_is_killed(model, reference, tmp_path):
    with two_nodes(model, tmp_path, POLICIES["none"]) as (head, node):
        assert completions(head) == reference
        rank = rank_1(node)
        os.kill(head.process.pid, signal.SIGKILL)
        assert node.wait(60) == 1, node.log()[-3000:]
        assert "the head is gone" in node.log()
        assert wait_gone([rank], 30) == []
        assert list(node.runtime.iterdir()) == []


def rank_1(node: Node) -> int:
    """Node 1's executor process (rank 1)."""
    ranks = [pid for pid in group_pids(node.process.pid) if pid != node.process.pid]
    assert len(ranks) == 1, ranks
    return ranks[0]


def test_a_hung_rank_on_node_1_fails_the_head(model, tmp_path):
    # The heartbeat timeout is short so that the test is; the hang is caught by the head's watchdog.
    with two_nodes(model, tmp_path, ["--dtype", "float32", "--heartbeat-timeout", "3"]) as (head, node):
        rank = rank_1(node)
        body = {"prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        stream = EventStream(head, "/v1/completions", body, timeout=60)
        assert stream.next_event()["choices"]  # generating
        os.kill(rank, signal.SIGSTOP)
        events = stream.rest()
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-3:]
        assert head.process.wait(60) != 0
        assert "executor-1" in head.log() and "no heartbeat" in head.log()
        # The head killed the hung rank through its node, then stopped the node: status 1.
        assert node.wait(60) == 1, node.log()[-3000:]
        assert wait_gone([rank], 30) == []


def test_swap_on_two_nodes_then_both_stop(model, reference, tmp_path):
    with two_nodes(model, tmp_path, POLICIES["swap"]) as (head, node):
        assert completions(head) == reference
        # A second node 1 is refused by the head (exit 2), and the engine goes on.
        port = int(node.process.args[node.process.args.index("--distributed-init-method") + 1].rsplit(":", 1)[1])
        second = Node(model, [*POLICIES["swap"], *node_flags(port, 1)], tmp_path / "second-run", tmp_path / "second.log")
        try:
            assert second.wait(120) == 2, second.log()[-3000:]
            assert "node 1 is connected already" in second.log()
        finally:
            second.stop()
        assert completions(head) == reference
        # SIGTERM drains the head, which stops node 1: both exit 0, nothing is left.
        rank = rank_1(node)
        head.process.send_signal(signal.SIGTERM)
        assert head.process.wait(60) == 0, head.log()[-3000:]
        assert node.wait(60) == 0, node.log()[-3000:]
        assert wait_gone([rank], 30) == []
        assert list(node.runtime.iterdir()) == [] and list(head.runtime.iterdir()) == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--tensor-parallel-size", "2", "--nnodes", "2", "--node-rank", "2"], ["--node-rank", "[0, --nnodes)"]),
        (["--tensor-parallel-size", "3", "--nnodes", "2"], ["--tensor-parallel-size 3", "--nnodes 2"]),
        (["--tensor-parallel-size", "2", "--nnodes", "2"], ["MASTER_ADDR", "tcp://HEAD:PORT"]),
        (
            ["--tensor-parallel-size", "2", "--nnodes", "2", "--distributed-init-method", "tcp://127.0.0.1:65533"],
            ["65533"],
        ),
    ],
)
def test_inconsistent_flags_exit_2(model, flags, named):
    with mock.patch.dict(os.environ):
        os.environ.pop("MASTER_ADDR", None)
        os.environ.pop("MASTER_PORT", None)
        assert_refused("serve", ["--model", str(model), *flags], *named)


# ---------------------------------------------------------------- the parts, without processes


def test_a_node_runs_the_head_configuration_with_its_own_model(model, tiny_model_dir, tmp_path):
    rendezvous = dict(tensor_parallel_size=2, nnodes=2, distributed_init_method="tcp://127.0.0.1:29500")
    head = preflight(EngineConfig(model=str(model), dtype="float32", kv_policy="pie", expansion="fixed:8", **rendezvous))
    here = tmp_path / "model-here"
    shutil.copytree(model, here)
    local = preflight(EngineConfig(model=str(here), dtype="float32", node_rank=1, max_num_seqs=3, **rendezvous))
    config = node_config(head, local)
    assert head.plan is not None and config.plan is not None and local.plan is not None
    # The head's settings and plan (host segments mean the same on every rank), the node's folder.
    assert (config.kv_policy, config.max_num_seqs, config.node_rank) == ("pie", 256, 1)
    assert config.plan.host == head.plan.host and config.plan.host.max_host_blocks == 8
    assert config.model == str(here) and config.plan.model_path == local.plan.model_path
    assert set(ignored_settings(head, local)) == {"--kv-policy none", "--expansion adaptive", "--max-num-seqs 3"}
    # Another model (head size 24, not 16) cannot join.
    other = preflight(EngineConfig(model=str(tiny_model_dir("qwen3")), dtype="float32", node_rank=1, **rendezvous))
    with pytest.raises(ConfigError, match="head_dim"):
        node_config(head, other)
    with pytest.raises(ConfigError, match="--tensor-parallel-size is 4 here but 2"):
        node_config(head, local.replace(tensor_parallel_size=4, plan=local.plan))


def test_the_ports_follow_the_rendezvous():
    config = EngineConfig(tensor_parallel_size=4, nnodes=2, distributed_init_method="env://")
    endpoint = head_endpoint(config, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (endpoint.host, endpoint.link_port) == ("10.0.0.1", 29501)
    assert endpoint.address(endpoint.executor_offset(3)) == "tcp://10.0.0.1:29507"
    assert [node_ranks(config, node) for node in range(2)] == [range(0, 2), range(2, 4)]
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        head_endpoint(config, {})


def test_a_remote_rank_makes_its_own_sealed_part_of_each_segment():
    layout = KVLayout(num_layers=2, block_size=4, num_kv_heads=1, head_dim=8, dtype=torch.float32)  # one rank's
    info = proto.HostSegmentInfo(segment_id=3, pid=1, fd=99, first_block=15, num_blocks=5)
    fd = LocalSegments(layout.block_bytes).open(info)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    segment = HostSegment.attach(info, layout, fd)  # checks the seals and the size, closes fd
    try:
        assert segment.tensor.shape == (2, 5, *layout.page_shape)
        segment.tensor[1, 4] = 2.5  # this rank's bytes, in this process only
        assert float(segment.tensor.sum()) == 2.5 * segment.tensor[1, 4].numel()
    finally:
        segment.close()
