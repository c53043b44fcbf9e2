"""Control messages between pied's processes: handshake, liveness, shutdown and stats.

These share sockets with the hot-path messages of :mod:`proto.messages`, and msgspec cannot decode a
union that mixes ``array_like`` and map-encoded structs, so every control message is ``array_like``
too: field order is the wire format, new fields go last and have defaults. Each is tagged with its
class name, so one typed ``msgspec.msgpack.Decoder(Union[...])`` per socket tells them apart.
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = [
    "Ready",
    "Heartbeat",
    "Shutdown",
    "Dead",
    "RankStats",
    "Stats",
    "ControlMessage",
    "ITERATION_TOKENS_BUCKETS",
]

CONTROL = dict(tag=True, array_like=True, omit_defaults=True, gc=False)

# Upper bounds of Stats.iteration_tokens_bucket_counts (vLLM's iteration_tokens_total buckets): the
# scheduler counts each step's tokens into the first bound at or above it, the last count is +Inf.
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class Ready(msgspec.Struct, **CONTROL):
    """A worker finished starting and takes work from now on. Sent once per worker, to the
    supervisor (and by the executor also to the scheduler, which needs the model's shape before it
    can plan anything).

    ``worker`` is the worker's name ("scheduler", "executor"), ``pid`` its process id (the thread
    owner's pid when actors run as threads). The model fields are filled by the executor (which
    loaded the model) and repeated by the scheduler: ``num_device_blocks`` device KV blocks of
    ``block_size`` tokens, ``max_model_len`` the longest sequence the engine accepts (prompt plus
    output), ``eos_token_ids`` the tokens that end generation unless ``ignore_eos``.
    """

    worker: str
    pid: int
    num_device_blocks: int = 0
    max_model_len: int = 0
    eos_token_ids: list[int] = []
    block_size: int = 0
    vocab_size: int = 0
    max_host_blocks: int = 0  # H_max: host block ids the scheduler's id space reserves


class Heartbeat(msgspec.Struct, **CONTROL):
    """A worker's loop is alive. Sent to the supervisor every heartbeat interval from the worker's
    event loop (not from a helper thread), so a worker whose loop is wedged or whose process is
    stopped goes silent. ``seq`` counts up from 0 per worker; ``time`` is the sender's
    ``time.monotonic()`` (only meaningful within one machine boot, used for diagnostics)."""

    worker: str
    seq: int
    time: float = 0.0


class Shutdown(msgspec.Struct, **CONTROL):
    """Stop: finish the current handler, close sockets and exit with status 0. Work in flight is
    dropped (the supervisor has already failed or finished every request). ``reason`` is logged."""

    reason: str = ""


class Dead(msgspec.Struct, **CONTROL):
    """A worker hit an error it cannot recover from and is about to exit non-zero. Sent to the
    supervisor as the worker's last message; the supervisor fails every request in flight and stops
    the other workers. ``reason`` is a one-line, human-readable cause (exception type and text)."""

    worker: str
    reason: str


class RankStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One tensor-parallel rank's own executor figures, summed over the steps it ran (a part of
    Stats): rank 0's from its StepResults, the others' from their RankStep messages, which may trail
    rank 0's by a step while the engine runs. Fields as in Stats; ``num_staging_blocks`` is the
    rank's staging ring as of its last step."""

    rank: int
    num_steps: int = 0
    step_seconds_total: float = 0.0
    forward_seconds_total: float = 0.0
    stall_seconds_total: float = 0.0
    bytes_to_device_total: int = 0
    bytes_to_host_total: int = 0
    num_staging_blocks: int = 0


class Stats(msgspec.Struct, **CONTROL):
    """The engine's one stats snapshot, from the scheduler to the frontend (``EngineClient.stats()``
    and ``/metrics`` read it as is). Sent after steps (throttled) and whenever the scheduler goes
    idle, so the last snapshot always reflects a quiescent engine.

    Counts and usage are the scheduler's. The ``*_total`` fields are running sums over all steps so
    far, named as ``/metrics`` exports them. Step timings are the executor's, from its StepResults:
    ``step_seconds_total`` its whole handling of each plan (inputs, forward, sampling; the one
    definition of step time), ``forward_seconds_total`` the model forward passes, and
    ``stall_seconds_total`` compute waiting for host KV copies. ``cycle_seconds_total`` is the
    scheduler's wall time per step (plan, send, wait for the result, postprocess, emit): the
    engine's overhead over any window is ``1 - Δforward / Δcycle`` between two snapshots. The host
    fields follow: the lease granted to the scheduler (host blocks), the bytes streamed each way, and
    the expansion controller's view, as the memory manager last reported it with the lease.

    Under tensor parallelism the step timings and bytes above are rank 0's (the StepResults the
    scheduler waits for), and ``ranks`` has every rank's own (empty with one rank).
    """

    num_running: int = 0
    num_waiting: int = 0
    num_device_blocks: int = 0
    num_host_blocks: int = 0
    device_usage: float = 0.0  # fraction of device KV blocks referenced
    host_usage: float = 0.0  # fraction of leased host KV blocks referenced
    num_preemptions: int = 0
    num_steps: int = 0
    cycle_seconds_total: float = 0.0
    forward_seconds_total: float = 0.0
    step_seconds_total: float = 0.0
    host_lease: int = 0
    bytes_to_device_total: int = 0
    bytes_to_host_total: int = 0
    stall_seconds_total: float = 0.0
    host_lease_target: int = 0  # the expansion controller's estimate of the transparent lease
    host_decision: str = ""  # its last decision and reason, e.g. "grow: demand, stalls 0% < 2%"
    host_link_bandwidth: float = 0.0  # its host -> device bandwidth estimate, bytes/s (0: unknown)
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_device_hits_total: int = 0  # of which found cached on the device tier
    prefix_cache_host_hits_total: int = 0  # and on the host tier
    num_computed_tokens_total: int = 0  # tokens the model ran (prefill, recompute and decode)
    prefix_cache_demotions_total: int = 0  # evicted device blocks kept on the host tier instead
    prefix_cache_promotions_total: int = 0  # host hits copied back to the device rather than streamed
    num_host_blocks_used: int = 0  # host KV blocks referenced (inside the lease)
    # Steps by the tokens they ran, per ITERATION_TOKENS_BUCKETS bound (not cumulative; empty until
    # the first step), and the tokens of all steps (num_computed_tokens_total is the same sum).
    iteration_tokens_bucket_counts: list[int] = []
    num_staging_blocks: int = 0  # the executor's staging ring: host blocks per step it serves (0: none)
    prefetch_depth: int = 0  # and how many layers ahead it loads them
    ranks: list[RankStats] = []  # per tensor-parallel rank, by rank (empty with one rank)


ControlMessage = Union[Ready, Heartbeat, Shutdown, Dead, Stats]
