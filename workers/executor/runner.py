"""The model runner: one StepPlan in, one StepResult out.

It owns the model, the device KV pool, the sampler, the per-request sampling state and the
executor's side of host KV (``host_kv.HostKV``). A step performs the plan's whole-block swaps,
decodes the plan's packed arrays, builds the step's tensors in one small host-to-device copy,
runs the forward pass (streaming the step's host blocks through the staging ring, if any) and
samples the rows the plan asks for. A request that asked for prompt logprobs also gets the logits of
its prompt positions computed in this step (after the sampled rows), whatever chunk of the prompt
the step holds; each position is sent once, even when a preempted request recomputes its prompt.

Decode steps run padded through the graph runner (``graphs.DecodeGraphs``): CUDA graphs on CUDA
with the triton backend unless ``--enforce-eager``, piecewise when a step streams host blocks. On
CUDA the device pool is sized after profiling the largest step (``kv_pool.num_profiled_kv_blocks``).

Host synchronization on CUDA: once per step, when the sampled tokens are copied to the host (the
sampler). The step's arrays are built with numpy and reach the device in one pinned, non-blocking
copy (``AttentionMetadata.from_layout`` eagerly, ``DecodeGraphs.prepare`` under graphs), and the
forward time comes from CUDA events (``ForwardTimer``). Two more remain where asked for: a step
that writes into host blocks waits for its last write-back (``LayerStreamer.finish``, which keeps
the step's copy timings final), and requested logprobs are copied after the tokens.

Async scheduling (``--async-scheduling``): the plan of step t+1 is made while step t runs, so it
may hold placeholders for the tokens step t samples; ``prepare`` fills them from what the last step
sampled (:mod:`workers.executor.token_feedback`), before the inputs reach the device.

Tensor parallelism (:mod:`workers.executor.parallel`): every rank runs every plan on its shard and its
slice of the KV pool (same block ids, its KV heads); only rank 0 keeps sampling state and samples,
the others keep the same states (the logits rows a step computes depend on them) but return a
result without tokens (which their actor does not send).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import compress

import numpy as np
import torch

import proto
from proto.config import ConfigError, EngineConfig
from workers.executor.attention import AttentionMetadata, StepLayout, make_attention_backend
from workers.executor.copy_throttle import CopyThrottle
from workers.executor.graphs import DecodeGraphs
from workers.executor.host_kv import HostKV
from workers.executor.kv_pool import DeviceMemoryProfile, KVPool, StagingRing, num_profiled_kv_blocks
from workers.executor.layer_timer import LayerTimer
from workers.executor.model import CausalLM
from workers.executor.parallel import SINGLE, TensorParallel
from workers.executor.sampler import PromptLogprobRun, Sampler, SamplingState
from workers.executor.step_spans import LayerTime
from workers.executor.streaming import HostBlockOwners, LayerStreamer, StreamStats
from workers.executor.token_feedback import SampledTokenFeedback
from workers.executor.weights import load_weights
from workers.grammar import GrammarCompiler
from workers.memory.host_pool import KVLayout, SegmentFdSource
from workers.model_config import ModelConfig
from workers.plan import num_staging_areas, plan_of


@dataclass
class StepInputs:
    """A plan as device tensors: the forward pass's arguments.

    A decode step run by the graph runner (``graph_batch > 0``) has its inputs in the runner's
    persistent rows instead: no ``input_ids``/``meta``, and its logits are the first rows of the
    padded batch's.
    """

    input_ids: torch.Tensor | None  # [T]
    meta: AttentionMetadata | None
    logits_indices: (
        torch.Tensor | None
    )  # rows of [T] whose logits are sampled, in plan order, then prompt rows
    sample: np.ndarray  # [num requests] bool: the plan's sample flags
    stream: LayerStreamer | None = None  # the step's host blocks, streamed through the ring
    graph_batch: int = 0  # the padded decode batch, 0: eager
    # Prompt positions whose logits give prompt logprobs: their rows follow the sampled ones.
    prompt_runs: list[PromptLogprobRun] = field(default_factory=list)

    @property
    def num_sampled_rows(self) -> int:
        return int(self.sample.sum())

    @property
    def positions(self) -> torch.Tensor:
        assert self.meta is not None
        return self.meta.positions


class ModelRunner:
    """Runs StepPlans on one device.

    It builds from the config's plan (``proto.plan.EnginePlan``: device, dtype, device KV blocks,
    host plan), as the daemon's preflight checked it. ``num_staging_blocks`` (M): the most distinct
    host blocks a step may use (default: the plan's, the largest lease under pie; 0: none). The pool
    then gets ``R * M`` staging pages after the ``L * D`` device pages, ``R = prefetch_depth + 1``
    (at most L); when D comes from a memory budget, the staging pages are part of it. Under adaptive
    expansion the memory manager then commands a ring of what the link can stream under one step's
    compute (``resize_staging``, between steps), and the pages of a narrower ring are freed.
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
        self.graph_mode = graph_mode(config, self.device, self.attention_backend)
        num_scratch_pages = 1 if self.graph_mode else 0  # where padded decode rows write
        self.num_device_blocks = self.plan.num_device_blocks or self.tp.min_over_ranks(
            self._num_cuda_kv_blocks((num_staging_pages + num_scratch_pages) * self.kv_layout.page_bytes),
            self.device,
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
            num_extra_pages=(staging.num_pages if staging else 0) + num_scratch_pages,
        )
        self.staging = staging
        self.copy_throttle = CopyThrottle.from_config(config, self.tp.rank)  # tests and benchmarks only
        self.host_kv = HostKV(
            self.kv_layout,
            self.kv_pool.pages,
            self.num_device_blocks,
            staging,
            blocks_per_segment or host.blocks_per_segment,
            self.device,
            self.copy_throttle.bytes_per_s,
            config.extra.get("host_page_kernel"),
            # A rank off the memory manager's machine makes segments of its own part only
            # (workers.executor.local_segments); on the head, part r of the memory manager's.
            part=(self.tp.rank, self.tp.size) if config.node_rank == 0 else (0, 1),
        )
        # Measured once, for the expansion controller's first decision (0 without a host tier).
        self.link_bandwidth = self.host_kv.measure_link_bandwidth() if config.kv_policy == "pie" else 0.0
        self.prefetch_next_step = prefetch_next_step
        self.stream_stats = StreamStats()  # the last step's (for benchmarks)
        # --trace-layers-every: while set (by the executor actor, on sampled steps), ``execute``
        # leaves each layer's times in ``layer_times`` (workers.executor.layer_timer).
        self.record_layer_times = False
        self.layer_times: list[LayerTime] = []
        self.sampler = Sampler(self.model_config.vocab_size, self.device, config.max_logprobs)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.grammar_compiler = GrammarCompiler(
            config.resolved_model(), self.model_config.vocab_size, self.eos_token_ids
        )
        self.states: dict[str, SamplingState] = {}
        self.feedback = SampledTokenFeedback()  # the last step's tokens, for the next plan's placeholders
        self.graphs: DecodeGraphs | None = None
        if self.graph_mode:
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_pool.pages,
                self.block_size,
                self.num_device_blocks,
                staging,
                config.max_num_seqs,
                -(-self.max_model_len // self.block_size),
            )
            if self.graph_mode == "capture":
                self.graphs.capture()

    # ---------------------------------------------------------------- host memory

    def attach_host_segments(self, infos: list[proto.HostSegmentInfo], open_fd: SegmentFdSource) -> None:
        """Map the memory manager's host segments, their descriptors from ``open_fd`` (and register
        them, on CUDA)."""
        self.host_kv.attach(infos, open_fd)

    def detach_host_segments(self, segment_ids: list[int]) -> None:
        """Unmap segments; the scheduler must hold no block in them any more."""
        self.host_kv.detach(segment_ids)

    def close(self) -> None:
        """Stop the copy engine and unmap every host segment."""
        self.host_kv.close()

    def resize_staging(self, prefetch_depth: int, num_staging_blocks: int) -> None:
        """Reshape the staging ring as the memory manager commands (``proto.PrefetchCommand``):
        ``num_staging_blocks`` host blocks per step, loaded ``prefetch_depth`` layers ahead. At most
        the plan's ring (the device budget reserved that much); a narrower ring's pages are freed.

        NOTE: between steps only (the actor runs it on the compute thread, between plans): every
        copy is drained and the prefetch of the next step dropped first, since both point into the
        old ring; the next step loads its first layers itself."""
        if self.staging is None:
            raise ValueError("this executor has no staging ring (kv_policy pie only): no prefetch to command.")
        if not 1 <= num_staging_blocks <= self.num_staging_blocks or prefetch_depth < 1:
            raise ValueError(
                f"a staging ring of {num_staging_blocks} blocks, {prefetch_depth} layers ahead: the ring holds "
                f"1 to {self.num_staging_blocks} blocks (the plan's) and loads at least one layer ahead."
            )
        num_areas = min(prefetch_depth + 1, self.model_config.num_layers)
        if (num_areas, num_staging_blocks) == (self.staging.num_areas, self.staging.area_size):
            return
        self.host_kv.drain()
        self.staging = StagingRing(self.staging.first_page, num_areas, num_staging_blocks)
        self.kv_pool.resize_extra_pages(self.staging.num_pages)
        self.host_kv.set_ring(self.kv_pool.pages, self.staging)

    def _num_cuda_kv_blocks(self, reserved_bytes: int) -> int:
        """The device KV pool the plan left to the executor (CUDA without --device-kv-blocks or
        --device-kv-gib), sized after profiling the largest step (``num_profiled_kv_blocks``). A run-time
        check: the activations are only known now."""
        profile = self._profile_device_memory()
        return num_profiled_kv_blocks(
            profile, self.config.gpu_memory_utilization, reserved_bytes, self.kv_layout.block_bytes
        )

    def _profile_device_memory(self) -> DeviceMemoryProfile:
        """Weights, then the peak of a dummy forward of ``--max-num-batched-tokens`` at the largest
        batch, and of a decode at ``--max-num-seqs`` (what the graph pool holds), on CUDA."""
        device = self.device
        torch.cuda.synchronize(device)
        weights = torch.cuda.memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        peaks = []
        config = self.config
        for num_tokens, num_seqs in (
            (config.max_num_batched_tokens, min(config.max_num_seqs, config.max_num_batched_tokens)),
            (config.max_num_seqs, config.max_num_seqs),
        ):
            torch.cuda.reset_peak_memory_stats(device)
            self.dummy_forward(num_tokens, num_seqs)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - weights)
        graph_pool = peaks[1] if self.graph_mode == "capture" else 0
        return DeviceMemoryProfile(total, weights, max(peaks[0], peaks[1]), graph_pool, free)

    def dummy_forward(self, num_tokens: int, num_seqs: int) -> torch.Tensor:
        """A forward pass (and the sampler's softmax) over ``num_tokens`` new tokens split evenly over
        ``num_seqs`` sequences, each starting at position 0, every block of a temporary one-block
        pool: the largest step's temporaries, for profiling. Returns the logits."""
        query_lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        query_lens[: num_tokens % num_seqs] += 1
        num_blocks = -(-query_lens // self.block_size)
        layout = StepLayout.build(
            query_lens, np.zeros(num_seqs), num_blocks, np.zeros(num_blocks.sum()), self.block_size, 1
        )
        last_rows = np.cumsum(query_lens) - 1
        meta, tensors = AttentionMetadata.from_layout(
            layout,
            self.device,
            dict(input_ids=np.zeros(num_tokens, dtype=np.int64), logits_indices=last_rows),
        )
        config = self.model_config
        pool = KVPool(
            config.num_layers,
            1,
            self.block_size,
            config.num_kv_heads,
            config.head_dim,
            self.dtype,
            self.device,
        )
        with torch.inference_mode():
            logits = self.model(
                tensors["input_ids"], meta.positions, meta, pool.pages, tensors["logits_indices"]
            )
            logits.softmax(dim=-1)
        return logits

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
        if self.copy_throttle.poll():  # a test's or benchmark's change of the emulated link, if any
            self.host_kv.set_throttle(self.copy_throttle.bytes_per_s)
        self.update_states(plan)
        swapped = self.swap(plan)
        inputs = self.prepare(plan)
        sampled_ids = list(compress(plan.request_ids, inputs.sample))
        states = [self.states[request_id] for request_id in sampled_ids]
        layers = self._layer_timer(inputs) if self.record_layer_times else None
        timer = ForwardTimer(self.device)
        try:
            all_logits = self.forward(inputs)
        finally:
            if layers is not None:
                layers.detach()
        logits = all_logits[: len(states)]
        timer.stop()
        if not self.tp.is_first:
            # Only rank 0 has the whole vocabulary's logits and samples; this rank keeps its states'
            # prompt-logprob progress in step with rank 0's, so both compute the same logits rows.
            for run in inputs.prompt_runs:
                run.state.next_prompt_logprob_row = run.first_position + run.num_rows
            states = []
        if states:
            # NOTE: the step's one host synchronization (on CUDA): the sampled tokens' copy to the host.
            token_ids, logprobs = self.sampler.sample(logits, states)
        else:  # every scheduled request is mid-prefill (or this rank does not sample)
            token_ids, logprobs = np.empty(0, dtype=np.int32), []
        forward_time = timer.seconds()
        # After the host synchronized with compute: the stall and copy timings are final.
        stats = inputs.stream.stats() if inputs.stream is not None else StreamStats()
        stats.bytes_to_device += swapped.bytes_to_device
        stats.bytes_to_host += swapped.bytes_to_host
        stats.copy_time += swapped.copy_time
        self.stream_stats = stats
        sampled_token_ids = token_ids.tolist()
        for state, token_id in zip(states, sampled_token_ids):
            state.append(token_id)
        self.feedback.record(plan.step_id, sampled_ids, sampled_token_ids)
        prompt_logprobs = (
            self.sampler.prompt_logprobs(all_logits[len(states) :], inputs.prompt_runs) if self.tp.is_first else []
        )
        if layers is not None:
            self.layer_times = layers.finish()  # after the step's host sync: its events are done
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
            num_staging_blocks=self.staging.area_size if self.staging else 0,
            prefetch_depth=self.staging.num_areas - 1 if self.staging else 0,
        )

    def _layer_timer(self, inputs: StepInputs) -> LayerTimer:
        """Times this step's layers (hooks for this step only) and its streamer's waits and copies."""
        timer = LayerTimer.create(self.model.layers, self.device)
        timer.attach()
        if isinstance(inputs.stream, LayerStreamer):
            inputs.stream.timer = timer
        return timer

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
        if len(plan.request_ids) != len(query_lens):
            raise ValueError(f"step {plan.step_id}: request_ids and num_scheduled_tokens differ in length.")
        # Async scheduling: the tokens the last step sampled, where the plan could only name them.
        token_ids = self.feedback.fill(plan, token_ids, query_lens)
        sample = np.frombuffer(plan.sample, dtype=np.uint8).astype(bool)
        if len(sample) != len(query_lens) or len(plan.request_ids) != len(query_lens):
            raise ValueError(
                f"step {plan.step_id}: request_ids, num_scheduled_tokens and sample differ in length."
            )
        num_blocks = proto.unpack_i32(plan.num_blocks)
        block_ids = proto.unpack_i32(plan.block_tables)
        layout = StepLayout.build(
            query_lens,
            proto.unpack_i32(plan.start_positions),
            num_blocks,
            block_ids,
            self.block_size,
            self.num_device_blocks,
            self.staging,
        )
        stream = None
        if len(layout.host_block_ids):
            owners = (
                self._host_block_owners(plan.request_ids, num_blocks, block_ids)
                if self.prefetch_next_step
                else None
            )
            stream = self.host_kv.streamer(layout.host_block_ids, layout.written_host_block_ids, owners)
            # The next step reads mostly the same host blocks: whatever it keeps is loaded already.
            stream.prefetch_next = owners is not None
        prompt_runs = self._prompt_logprob_runs(plan.request_ids, query_lens, layout.start_positions)
        # A step timed layer by layer runs eagerly: a replayed graph would skip the layers' hooks.
        graphed = self.graphs is not None and not prompt_runs and not self.record_layer_times
        if graphed and self.graphs.accepts(layout):
            batch = self.graphs.prepare(layout, token_ids)
            return StepInputs(None, None, None, sample, stream, graph_batch=batch)
        last_rows = np.cumsum(query_lens, dtype=np.int64) - 1
        logits_indices = last_rows[sample]
        if prompt_runs:
            extra = [run.token_row + np.arange(run.num_rows, dtype=np.int64) for run in prompt_runs]
            logits_indices = np.concatenate([logits_indices, *extra])
        # NOTE: the metadata, token ids and logits rows reach the device in one copy.
        meta, tensors = AttentionMetadata.from_layout(
            layout, self.device, dict(input_ids=token_ids, logits_indices=logits_indices)
        )
        meta.stream = stream
        return StepInputs(
            tensors["input_ids"], meta, tensors["logits_indices"], sample, stream, 0, prompt_runs
        )

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
                    runs.append(
                        PromptLogprobRun(request_id, state, token_row + first - start, first, end - first)
                    )
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
        """Float32 logits of the step's sampled rows."""
        stream = inputs.stream
        if stream is None:
            return self._forward(inputs)
        completed = False
        stream.start()
        try:
            logits = self._forward(inputs)
            completed = True
            return logits
        finally:
            # NOTE: write-backs are on the host when this returns (and, after a failure, every copy
            # is done); a prefetch of the next step's first layers may still be running.
            stream.finish(completed)

    def _forward(self, inputs: StepInputs) -> torch.Tensor:
        if inputs.graph_batch:
            assert self.graphs is not None
            logits = self.graphs.run(inputs.graph_batch, inputs.stream)[: len(inputs.sample)]
            if inputs.sample.all():
                return logits
            rows = torch.from_numpy(np.flatnonzero(inputs.sample)).to(self.device, non_blocking=True)
            return logits[rows]
        assert inputs.input_ids is not None and inputs.meta is not None and inputs.logits_indices is not None
        with torch.inference_mode():
            return self.model(
                inputs.input_ids, inputs.positions, inputs.meta, self.kv_pool.pages, inputs.logits_indices
            )


class ForwardTimer:
    """The forward pass's time: wall time on CPU, CUDA events on the compute stream on CUDA (so the
    pass itself, not its launch, is timed without a host synchronization of its own). NOTE: the
    compute stream only: a prefetch of the next step may still run on the copy stream, and should."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.start = time.perf_counter()
        self.end = self.start

    def stop(self) -> None:
        if self.cuda:
            self.end_event.record()
        self.end = time.perf_counter()

    def seconds(self) -> float:
        """Valid after ``stop``; on CUDA waits for the pass (done already once the tokens were read)."""
        if not self.cuda:
            return self.end - self.start
        self.end_event.synchronize()
        return self.start_event.elapsed_time(self.end_event) / 1e3


def graph_mode(config: EngineConfig, device: torch.device, attention_backend: str) -> str | None:
    """How decode steps run: ``"capture"`` (CUDA graphs), ``"pad"`` (the graphs' padded path, eagerly:
    ``config.extra["decode_padding"]``, for tests on CPU), or None (eager).

    Graphs are captured on CUDA unless ``--enforce-eager``, with the triton backend only: the torch
    backend padded to the model length would gather every sequence's KV up to it in every layer.
    """
    if config.enforce_eager:
        return None
    if device.type == "cuda" and attention_backend == "triton":
        return "capture"
    if config.extra.get("decode_padding"):
        return "pad"
    return None
