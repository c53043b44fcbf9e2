"""The model runner: one StepPlan in, one StepResult out.

It owns the model, the device KV pool, the sampler and the per-request sampling state. A step
decodes the plan's packed arrays, builds the step's tensors in two small host-to-device copies,
runs the forward pass and samples the rows the plan asks for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import compress

import numpy as np
import torch

import proto
from pied.config import ConfigError, EngineConfig
from pied.model_config import ModelConfig, resolve_dtype
from workers.executor.attention import AttentionMetadata, arrays_to_device
from workers.executor.kv_pool import GIB, KVPool, kv_bytes_per_block, num_blocks_that_fit
from workers.executor.model import CausalLM
from workers.executor.sampler import Sampler, SamplingState
from workers.executor.weights import load_weights

DEFAULT_CPU_KV_GIB = 1.0


@dataclass
class StepInputs:
    """A plan as device tensors: the forward pass's arguments."""

    input_ids: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # rows of [T] whose logits are sampled, in plan order
    sample: np.ndarray  # [num requests] bool: the plan's sample flags

    @property
    def positions(self) -> torch.Tensor:
        return self.meta.positions


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.resolved_device())
        torch.manual_seed(config.seed)
        self.model_config = ModelConfig.from_folder(config.resolved_model())
        self.dtype = resolve_dtype(config.dtype, self.model_config.dtype, self.device.type)
        self.block_size = config.block_size
        with torch.device(self.device):
            self.model = CausalLM(self.model_config, self.dtype)
        load_weights(self.model.checkpoint_targets(), self.model_config.path)
        self.model.eval()
        self.num_device_blocks = self._num_kv_blocks()
        self.kv_pool = KVPool(
            self.model_config.num_layers,
            self.num_device_blocks,
            self.block_size,
            self.model_config.num_kv_heads,
            self.model_config.head_dim,
            self.dtype,
            self.device,
        )
        self.sampler = Sampler(self.model_config.vocab_size, self.device, config.max_logprobs)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        self.states: dict[str, SamplingState] = {}

    def _num_kv_blocks(self) -> int:
        """``--device-kv-blocks``, else what fits in ``--device-kv-gib``, else the default budget:
        1 GiB on CPU; on CUDA ``gpu_memory_utilization`` of the memory free after loading weights."""
        if self.config.device_kv_blocks is not None:
            return self.config.device_kv_blocks
        bytes_per_block = kv_bytes_per_block(
            self.model_config.num_layers,
            self.block_size,
            self.model_config.num_kv_heads,
            self.model_config.head_dim,
            self.dtype,
        )
        if self.config.device_kv_gib is not None:
            budget, source = self.config.device_kv_gib * GIB, f"--device-kv-gib {self.config.device_kv_gib}"
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.gpu_memory_utilization
            source = (
                f"--gpu-memory-utilization {self.config.gpu_memory_utilization} of {free / GIB:.2f} GiB free"
            )
        else:
            budget, source = DEFAULT_CPU_KV_GIB * GIB, f"the default {DEFAULT_CPU_KV_GIB} GiB on CPU"
        num_blocks = num_blocks_that_fit(budget, bytes_per_block)
        if num_blocks < 1:
            raise ConfigError(
                f"{source} holds no KV block ({bytes_per_block} bytes each); raise it or set --device-kv-blocks."
            )
        return num_blocks

    def execute(self, plan: proto.StepPlan) -> proto.StepResult:
        step_start = time.perf_counter()
        self.update_states(plan)
        inputs = self.prepare(plan)
        states = [self.states[request_id] for request_id in compress(plan.request_ids, inputs.sample)]
        forward_start = time.perf_counter()
        logits = self.forward(inputs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # so forward_time is the forward pass, not its launch
        forward_time = time.perf_counter() - forward_start
        if states:
            token_ids, logprobs = self.sampler.sample(logits, states)
        else:  # every scheduled request is mid-prefill
            token_ids, logprobs = np.empty(0, dtype=np.int32), []
        for state, token_id in zip(states, token_ids.tolist()):
            state.append(token_id)
        return proto.StepResult(
            step_id=plan.step_id,
            sampled_token_ids=proto.pack_i32(token_ids),
            logprobs=logprobs if any(entry is not None for entry in logprobs) else [],
            forward_time=forward_time,
            step_time=time.perf_counter() - step_start,
        )

    def update_states(self, plan: proto.StepPlan) -> None:
        """Drop finished requests' sampling state, then create it for the plan's new requests."""
        for request_id in plan.finished_request_ids:
            self.states.pop(request_id, None)
        for new in plan.new_requests:
            self.states[new.request_id] = SamplingState(
                new.params,
                proto.unpack_i32(new.prompt_token_ids),
                self.model_config.vocab_size,
                self.eos_token_ids,
                self.device,
            )
        unknown = [request_id for request_id in plan.request_ids if request_id not in self.states]
        if unknown:
            raise ValueError(f"step {plan.step_id} schedules requests never sent as new: {unknown}.")

    def compute_logits(self, plan: proto.StepPlan) -> torch.Tensor:
        """Float32 logits ``[num sampled rows, vocab]`` for the rows with ``sample[i] == 1``."""
        return self.forward(self.prepare(plan))

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
        meta = AttentionMetadata.build(
            query_lens,
            proto.unpack_i32(plan.start_positions),
            proto.unpack_i32(plan.num_blocks),
            proto.unpack_i32(plan.block_tables),
            self.block_size,
            self.num_device_blocks,
            self.device,
        )
        last_rows = np.cumsum(query_lens, dtype=np.int64) - 1
        tensors = arrays_to_device(dict(input_ids=token_ids, logits_indices=last_rows[sample]), self.device)
        return StepInputs(tensors["input_ids"], meta, tensors["logits_indices"], sample)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(
                inputs.input_ids, inputs.positions, inputs.meta, self.kv_pool.pages, inputs.logits_indices
            )
