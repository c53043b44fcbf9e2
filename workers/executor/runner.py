"""The model runner: one StepPlan in, one StepResult out.

It owns the model, the device KV pool, the sampler, the per-request sampling state and the
executor's side of host KV (``host_kv.HostKV``). A step performs the plan's whole-block swaps,
decodes the plan's packed arrays, builds the step's tensors in two small host-to-device copies,
runs the forward pass (streaming the step's host blocks through the staging ring, if any) and
samples the rows the plan asks for. A request that asked for prompt logprobs also gets the logits of
its prompt positions computed in this step (after the sampled rows), whatever chunk of the prompt
the step holds; each position is sent once, even when a preempted request recomputes its prompt.

Where this differs from DESIGN.md ("Executor on accelerators"), as built today: decode runs eagerly
(no CUDA graphs yet), the scheduler does not yet plan step t+1 while step t runs, the device pool is
sized from ``--gpu-memory-utilization`` after the weights load rather than after profiling the
largest step, and on CUDA host pages still reach the staging ring through the copy engine: the
host-page kernel (``triton_host_pages``) exists and is tested but is not wired in.

Tensor parallelism (:mod:`workers.executor.parallel`): every rank runs every plan on its shard and its
slice of the KV pool (same block ids, its KV heads); only rank 0 keeps sampling state and samples,
the others keep the same states (the logits rows a step computes depend on them) but return a
result without tokens (which their actor does not send).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import compress

import numpy as np
import torch

import proto
from proto.config import ConfigError, EngineConfig
from workers.executor.attention import AttentionMetadata, arrays_to_device, make_attention_backend
from workers.executor.host_kv import HostKV
from workers.executor.kv_pool import GIB, KVPool, StagingRing, num_blocks_that_fit
from workers.executor.model import CausalLM
from workers.executor.parallel import SINGLE, TensorParallel
from workers.executor.sampler import PromptLogprobRun, Sampler, SamplingState
from workers.executor.streaming import HostBlockOwners, LayerStreamer, StreamStats
from workers.executor.weights import load_weights
from workers.grammar import GrammarCompiler
from workers.memory.host_pool import KVLayout
from workers.model_config import ModelConfig
from workers.plan import num_staging_areas, plan_of

# Test only: caps the CPU copy thread's bandwidth (bytes/s) to create stalls on purpose.
COPY_THROTTLE_ENV = "PIED_COPY_THROTTLE_BYTES_PER_S"


@dataclass
class StepInputs:
    """A plan as device tensors: the forward pass's arguments."""

    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of [T] whose logits are sampled, in plan order, then prompt rows
    sample: np.ndarray  # [num requests] bool: the plan's sample flags
    # Prompt positions whose logits give prompt logprobs: their rows follow the sampled ones.
    prompt_runs: list[PromptLogprobRun] = field(default_factory=list)

    @property
    def num_sampled_rows(self) -> int:
        return int(self.sample.sum())

    @property
    def positions(self) -> torch.Tensor:
        return self.meta.positions


class ModelRunner:
    """Runs StepPlans on one device.

    It builds from the config's plan (``proto.plan.EnginePlan``: device, dtype, device KV blocks,
    host plan), as the daemon's preflight checked it. ``num_staging_blocks`` (M): the most distinct
    host blocks a step may use (default: the plan's, the largest lease under pie; 0: none). The pool
    then gets ``R * M`` staging pages after the ``L * D`` device pages, ``R = prefetch_depth + 1``
    (at most L); when D comes from a memory budget, the staging pages are part of it.
    ``blocks_per_segment``: the host pool's segment size (default: the plan's).
    ``prefetch_next_step``: during a step's last layers, load the next step's first layers (used
    when its host blocks are the same).
    """

    def __init__(
        self,
        config: EngineConfig,
        num_staging_blocks: int | None = None,
        blocks_per_segment: int | None = None,
        prefetch_next_step: bool = True,
        tensor_parallel: TensorParallel = SINGLE,
    ) -> None:
        """``tensor_parallel``: this rank's place (its process group joined already)."""
        if num_staging_blocks is not None and num_staging_blocks < 0:
            raise ValueError(f"num_staging_blocks must be non-negative, got {num_staging_blocks}.")
        self.config = config
        self.plan = plan_of(config, num_staging_blocks)
        self.tp = tensor_parallel
        self.device = torch.device(self.plan.device)
        if self.tp.size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", self.tp.local_rank)  # rank r on cuda:r
        torch.manual_seed(config.seed)
        self.model_config = ModelConfig.from_folder(self.plan.model_path)
        self.dtype = getattr(torch, self.plan.dtype)
        self.block_size = config.block_size
        self.attention_backend = config.resolved_attention_backend(self.device.type)
        backend = make_attention_backend(self.attention_backend, self.device)
        with torch.device(self.device):
            self.model = CausalLM(self.model_config, self.dtype, backend, self.tp)
        model_config = self.model_config
        self.weight_bytes_read = load_weights(
            self.model.checkpoint_targets(), model_config.path, model_config.fp8_block_size
        )
        self.model.eval()
        num_layers = self.model_config.num_layers
        # This rank's KV heads (all of them without tensor parallelism).
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads
        self.kv_layout = KVLayout(num_layers, self.block_size, self.num_kv_heads, self.model_config.head_dim, self.dtype)
        host = self.plan.host
        if num_staging_blocks is None:
            num_staging_blocks = host.num_staging_blocks
        self.num_staging_blocks = num_staging_blocks
        self.max_host_blocks = host.max_host_blocks
        num_areas = num_staging_areas(config, self.model_config)
        num_staging_pages = num_areas * num_staging_blocks
        self.num_device_blocks = self.plan.num_device_blocks or self.tp.min_over_ranks(
            self._num_cuda_kv_blocks(num_staging_pages * self.kv_layout.page_bytes), self.device
        )
        self.max_model_len = self._max_model_len()
        staging = None
        if num_staging_blocks:
            staging = StagingRing(num_layers * self.num_device_blocks, num_areas, num_staging_blocks)
        self.kv_pool = KVPool(
            num_layers,
            self.num_device_blocks,
            self.block_size,
            self.num_kv_heads,
            self.model_config.head_dim,
            self.dtype,
            self.device,
            num_extra_pages=staging.num_pages if staging else 0,
        )
        self.staging = staging
        self.host_kv = HostKV(
            self.kv_layout,
            self.kv_pool.pages,
            self.num_device_blocks,
            staging,
            blocks_per_segment or host.blocks_per_segment,
            self.device,
            self._copy_throttle(),
            part=(self.tp.rank, self.tp.size),
        )
        # Measured once, for the expansion controller's first decision (0 without a host tier).
        self.link_bandwidth = self.host_kv.measure_link_bandwidth() if config.kv_policy == "pie" else 0.0
        self.prefetch_next_step = prefetch_next_step
        self.stream_stats = StreamStats()  # the last step's (for benchmarks)
        self.sampler = Sampler(self.model_config.vocab_size, self.device, config.max_logprobs)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.grammar_compiler = GrammarCompiler(
            config.resolved_model(), self.model_config.vocab_size, self.eos_token_ids
        )
        self.states: dict[str, SamplingState] = {}

    def _copy_throttle(self) -> float | None:
        """``config.extra["copy_throttle_bytes_per_s"]``, else ``$PIED_COPY_THROTTLE_BYTES_PER_S`` (read
        once, here); CPU copy thread only."""
        value = self.config.extra.get("copy_throttle_bytes_per_s", os.environ.get(COPY_THROTTLE_ENV))
        if value in (None, ""):
            return None
        try:
            throttle = float(value)
        except ValueError:
            throttle = -1.0
        if throttle <= 0:
            raise ConfigError(
                f"the copy throttle must be a positive number of bytes per second, got {value!r}."
            )
        return throttle

    # ---------------------------------------------------------------- host memory

    def attach_host_segments(self, infos: list[proto.HostSegmentInfo]) -> None:
        """Map the memory manager's host segments (and pin them, on CUDA)."""
        self.host_kv.attach(infos)

    def detach_host_segments(self, segment_ids: list[int]) -> None:
        """Unmap segments; the scheduler must hold no block in them any more."""
        self.host_kv.detach(segment_ids)

    def close(self) -> None:
        """Stop the copy engine and unmap every host segment."""
        self.host_kv.close()

    def _num_cuda_kv_blocks(self, reserved_bytes: int) -> int:
        """The device KV pool the plan left to the executor (CUDA without --device-kv-blocks or
        --device-kv-gib): ``gpu_memory_utilization`` of the memory free after loading the weights,
        less ``reserved_bytes`` (the staging ring). A run-time check: free memory is only known now."""
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = free * self.config.gpu_memory_utilization
        num_blocks = num_blocks_that_fit(budget - reserved_bytes, self.kv_layout.block_bytes)
        if num_blocks < 1:
            raise ConfigError(
                f"--gpu-memory-utilization {self.config.gpu_memory_utilization} of {free / GIB:.2f} GiB free holds "
                f"no KV block ({self.kv_layout.block_bytes} bytes each); raise it or set --device-kv-blocks."
            )
        return num_blocks

    def _max_model_len(self) -> int:
        """The plan's model length; when the pool was sized here, checked (or, when not given,
        lowered) against it as the preflight does for a pool it sized."""
        if self.plan.num_device_blocks is not None:
            return self.plan.max_model_len
        pool_blocks = self.num_device_blocks + (self.max_host_blocks if self.config.kv_policy == "pie" else 0)
        pool_tokens = pool_blocks * self.block_size
        if self.plan.max_model_len <= pool_tokens:
            return self.plan.max_model_len
        if self.config.max_model_len is None:
            return pool_tokens
        raise ConfigError(
            f"--max-model-len {self.plan.max_model_len} does not fit the {pool_blocks} KV blocks of "
            f"{self.block_size} tokens that --gpu-memory-utilization {self.config.gpu_memory_utilization} leaves; "
            "raise it or lower --max-model-len."
        )

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        step_start = time.perf_counter()
        self.update_states(plan)
        swapped = self.swap(plan)
        inputs = self.prepare(plan)
        states = [self.states[request_id] for request_id in compress(plan.request_ids, inputs.sample)]
        forward_start = time.perf_counter()
        all_logits = self.forward(inputs)
        logits = all_logits[: len(states)]
        if self.device.type == "cuda":
            # So forward_time is the forward pass, not its launch. NOTE: the compute stream only: a
            # prefetch of the next step may still be running on the copy stream, and should.
            torch.cuda.current_stream(self.device).synchronize()
        forward_time = time.perf_counter() - forward_start
        stats = inputs.meta.stream.stats() if isinstance(inputs.meta.stream, LayerStreamer) else StreamStats()
        stats.bytes_to_device += swapped.bytes_to_device
        stats.bytes_to_host += swapped.bytes_to_host
        stats.copy_time += swapped.copy_time
        self.stream_stats = stats
        if not self.tp.is_first:
            # Only rank 0 has the whole vocabulary's logits and samples; this rank keeps its states'
            # prompt-logprob progress in step with rank 0's, so both compute the same logits rows.
            for run in inputs.prompt_runs:
                run.state.next_prompt_logprob_row = run.first_position + run.num_rows
            states = []
        if states:
            token_ids, logprobs = self.sampler.sample(logits, states)
        else:  # every scheduled request is mid-prefill (or this rank does not sample)
            token_ids, logprobs = np.empty(0, dtype=np.int32), []
        for state, token_id in zip(states, token_ids.tolist()):
            state.append(token_id)
        prompt_logprobs = (
            self.sampler.prompt_logprobs(all_logits[len(states) :], inputs.prompt_runs) if self.tp.is_first else []
        )
        return proto.StepResult(
            step_id=plan.step_id,
            sampled_token_ids=proto.pack_i32(token_ids),
            logprobs=logprobs if any(entry is not None for entry in logprobs) else [],
            forward_time=forward_time,
            step_time=time.perf_counter() - step_start,
            num_host_blocks=stats.num_host_blocks,
            bytes_to_device=stats.bytes_to_device,
            bytes_to_host=stats.bytes_to_host,
            stall_time=stats.stall_time,
            layer_compute_time=max(0.0, forward_time - stats.stall_time) / self.model_config.num_layers,
            copy_time=stats.copy_time,
            link_bandwidth=self.link_bandwidth,
            prompt_logprobs=prompt_logprobs,
        )

    def swap(self, plan: proto.StepPlan) -> StreamStats:
        """The plan's whole-block copies across tiers, swap_out first; done when this returns."""
        if not plan.swap_out and not plan.swap_in:
            return StreamStats()
        swap_out, swap_in = (proto.unpack_i32(pairs) for pairs in (plan.swap_out, plan.swap_in))
        if len(swap_out) % 2 or len(swap_in) % 2:
            raise ValueError(f"step {plan.step_id}: swap_out and swap_in must hold (src, dst) pairs.")
        return self.host_kv.swap(swap_out.reshape(-1, 2), swap_in.reshape(-1, 2))

    def update_states(self, plan: proto.StepPlan) -> None:
        """Drop finished requests' sampling state, then create it for the plan's new requests (on
        every tensor-parallel rank: which logits rows a step computes depends on it)."""
        for request_id in plan.finished_request_ids:
            self.states.pop(request_id, None)
        for new in plan.new_requests:
            self.states[new.request_id] = SamplingState(
                new.params,
                proto.unpack_i32(new.prompt_token_ids),
                self.model_config.vocab_size,
                self.eos_token_ids,
                self.device,
                self.grammar_compiler,
            )
        unknown = [request_id for request_id in plan.request_ids if request_id not in self.states]
        if unknown:
            raise ValueError(f"step {plan.step_id} schedules requests never sent as new: {unknown}.")

    def compute_logits(self, plan: proto.StepPlan) -> torch.Tensor:
        """Float32 logits ``[num sampled rows, vocab]`` for the rows with ``sample[i] == 1``."""
        inputs = self.prepare(plan)
        return self.forward(inputs)[: inputs.num_sampled_rows]

    def prepare(self, plan: proto.StepPlan) -> StepInputs:
        query_lens = proto.unpack_i32(plan.num_scheduled_tokens)
        token_ids = proto.unpack_i32(plan.token_ids)
        if len(token_ids) != query_lens.sum():
            raise ValueError(
                f"step {plan.step_id}: {len(token_ids)} token ids for {query_lens.sum()} scheduled tokens."
            )
        sample = np.frombuffer(plan.sample, dtype=np.uint8).astype(bool)
        if len(sample) != len(query_lens) or len(plan.request_ids) != len(query_lens):
            raise ValueError(
                f"step {plan.step_id}: request_ids, num_scheduled_tokens and sample differ in length."
            )
        num_blocks = proto.unpack_i32(plan.num_blocks)
        block_ids = proto.unpack_i32(plan.block_tables)
        meta = AttentionMetadata.build(
            query_lens,
            proto.unpack_i32(plan.start_positions),
            num_blocks,
            block_ids,
            self.block_size,
            self.num_device_blocks,
            self.device,
            self.staging,
        )
        if len(meta.host_block_ids):
            owners = (
                self._host_block_owners(plan.request_ids, num_blocks, block_ids)
                if self.prefetch_next_step
                else None
            )
            stream = self.host_kv.streamer(meta.host_block_ids, meta.written_host_block_ids, owners)
            # The next step reads mostly the same host blocks: whatever it keeps is loaded already.
            stream.prefetch_next = owners is not None
            meta.stream = stream
        last_rows = np.cumsum(query_lens, dtype=np.int64) - 1
        logits_indices = last_rows[sample]
        prompt_runs = self._prompt_logprob_runs(plan.request_ids, query_lens, proto.unpack_i32(plan.start_positions))
        if prompt_runs:
            extra = [run.token_row + np.arange(run.num_rows, dtype=np.int64) for run in prompt_runs]
            logits_indices = np.concatenate([logits_indices, *extra])
        tensors = arrays_to_device(dict(input_ids=token_ids, logits_indices=logits_indices), self.device)
        return StepInputs(tensors["input_ids"], meta, tensors["logits_indices"], sample, prompt_runs)

    def _prompt_logprob_runs(
        self, request_ids: list[str], query_lens: np.ndarray, start_positions: np.ndarray
    ) -> list[PromptLogprobRun]:
        """The prompt positions of this step whose logits are owed as prompt logprobs."""
        runs = []
        token_row = 0  # the request's first token in the step
        for request_id, num_tokens, start in zip(request_ids, query_lens.tolist(), start_positions.tolist()):
            state = self.states.get(request_id)
            if state is not None and state.prompt_logprob_targets is not None:
                first, end = state.prompt_logprob_rows(start, num_tokens)
                if first < end:
                    runs.append(PromptLogprobRun(request_id, state, token_row + first - start, first, end - first))
            token_row += num_tokens
        return runs

    def _host_block_owners(
        self, request_ids: list[str], num_blocks: np.ndarray, block_ids: np.ndarray
    ) -> HostBlockOwners:
        is_host = block_ids >= self.num_device_blocks
        owner_rows = np.repeat(np.arange(len(request_ids)), num_blocks)[is_host]
        owners: dict[int, set[str]] = {}
        for row, block_id in zip(owner_rows.tolist(), block_ids[is_host].tolist()):
            owners.setdefault(block_id, set()).add(request_ids[row])
        return {block_id: frozenset(requests) for block_id, requests in owners.items()}

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        stream = inputs.meta.stream
        if not isinstance(stream, LayerStreamer):
            with torch.inference_mode():
                return self.model(
                    inputs.input_ids, inputs.positions, inputs.meta, self.kv_pool.pages, inputs.logits_indices
                )
        completed = False
        stream.start()
        try:
            with torch.inference_mode():
                logits = self.model(
                    inputs.input_ids, inputs.positions, inputs.meta, self.kv_pool.pages, inputs.logits_indices
                )
            completed = True
            return logits
        finally:
            # NOTE: write-backs are on the host when this returns (and, after a failure, every copy
            # is done); a prefetch of the next step's first layers may still be running.
            stream.finish(completed)
