"""Every wire message round-trips through msgpack: packed arrays, omitted defaults, enums, tags.

A new message in ``proto/`` must get an example in ``EXAMPLES`` (``test_every_message_has_an_example``
fails otherwise): a wire-format change updates its round-trip test in the same commit.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Union

import msgspec
import numpy as np
import pytest

import proto
import proto.config
import proto.control
import proto.messages
import proto.plan
from proto import FinishReason, SamplingParams, pack_f32, pack_i32, unpack_f32, unpack_i32

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
FULL_PARAMS = SamplingParams(
    n=1,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    seed=1234,
    presence_penalty=0.5,
    frequency_penalty=-0.5,
    repetition_penalty=1.1,
    max_tokens=None,
    min_tokens=2,
    stop=["\n\n", "###"],
    stop_token_ids=[2, 4],
    ignore_eos=True,
    logprobs=5,
    skip_special_tokens=False,
    include_stop_str_in_output=True,
    allowed_token_ids=[7, 9, 11],
    bad_words_token_ids=[[5], [6, 8]],
    grammar=proto.GrammarConstraint(proto.GrammarKind.JSON_SCHEMA, '{"type": "object"}'),
)
LOGPROBS = proto.TokenLogprobs(logprob=-0.25, top_ids=pack_i32([7, 3, 9]), top_logprobs=pack_f32([-0.25, -1.5, -3.0]))
PROMPT_LOGPROBS = proto.PromptLogprobs(
    "r1", 1, pack_f32([-2.5, -0.5]), pack_i32([7, 1]), 2, pack_i32([4, 9, 8, 4]), pack_f32([-1.0, -2.0, -0.5, -1.5])
)

# One or more examples per message: a minimal one (defaults) and one with every field set.
EXAMPLES: dict[type, list[msgspec.Struct]] = {
    SamplingParams: [SamplingParams(), GREEDY, FULL_PARAMS, SamplingParams(max_tokens=1, prompt_logprobs=5)],
    proto.PromptLogprobs: [proto.PromptLogprobs("r0", 3, pack_f32([-1.0]), pack_i32([2])), PROMPT_LOGPROBS],
    proto.GrammarConstraint: [
        proto.GrammarConstraint(proto.GrammarKind.REGEX, "[a-z]+"),
        proto.GrammarConstraint(proto.GrammarKind.EBNF, 'root ::= "yes" | "no"'),
    ],
    proto.AddRequest: [
        proto.AddRequest("r0", pack_i32([1, 2, 3]), GREEDY),
        proto.AddRequest("r1", pack_i32(np.arange(1000)), FULL_PARAMS, 1712.5, "00-abc-def-01"),
    ],
    proto.AbortRequests: [proto.AbortRequests([]), proto.AbortRequests(["a", "b"])],
    proto.TokenLogprobs: [proto.TokenLogprobs(logprob=-1.0), LOGPROBS],
    proto.TokenDelta: [
        proto.TokenDelta("r0", pack_i32([5])),
        proto.TokenDelta(
            "r1",
            pack_i32([5, 2]),
            finish_reason=FinishReason.STOP,
            stop_token_id=2,
            num_prompt_tokens=3,
            logprobs=[LOGPROBS, LOGPROBS],
            num_cached_tokens=16,
            trace_context="00-abc-def-01",
            phases=proto.RequestPhases(0.25, 0.5, 1.5),
        ),
        proto.TokenDelta("r2", b"", finish_reason=FinishReason.ERROR, error="the model failed"),
        proto.TokenDelta("r1", pack_i32([5]), num_prompt_tokens=3, prompt_logprobs=[PROMPT_LOGPROBS]),
    ],
    proto.RequestPhases: [proto.RequestPhases(0.0, 0.001, 2.5)],
    proto.TokenDeltas: [
        proto.TokenDeltas([]),
        proto.TokenDeltas([proto.TokenDelta("r0", pack_i32([5])), proto.TokenDelta("r1", b"", FinishReason.ABORT)]),
    ],
    proto.NewRequestData: [proto.NewRequestData("r0", pack_i32([1, 2]), GREEDY)],
    proto.StepPlan: [
        proto.StepPlan(0, [], b"", b"", b"", b"", b"", b""),
        proto.StepPlan(
            step_id=7,
            request_ids=["r0", "r1"],
            num_scheduled_tokens=pack_i32([3, 1]),
            token_ids=pack_i32([1, 2, 3, 9]),
            start_positions=pack_i32([0, 17]),
            num_blocks=pack_i32([1, 2]),
            block_tables=pack_i32([4, 0, 1]),
            sample=bytes([1, 1]),
            new_requests=[proto.NewRequestData("r0", pack_i32([1, 2, 3]), FULL_PARAMS)],
            finished_request_ids=["r9"],
            swap_out=pack_i32([5, 70]),
            swap_in=pack_i32([71, 6]),
        ),
    ],
    proto.StepResult: [
        proto.StepResult(0, b""),
        proto.StepResult(3, pack_i32([11, 12]), [None, LOGPROBS], forward_time=0.012, step_time=0.015),
        proto.StepResult(5, pack_i32([1]), num_host_blocks=12, bytes_to_device=1 << 33, bytes_to_host=4096,
                         stall_time=0.001, layer_compute_time=0.0004, copy_time=0.002, link_bandwidth=2.5e10),
        proto.StepResult(6, b"", num_host_blocks=3, num_staging_blocks=48, prefetch_depth=2),
        proto.StepResult(4, b"", error="CUDA error: out of memory"),
        proto.StepResult(6, pack_i32([3]), prompt_logprobs=[PROMPT_LOGPROBS]),
    ],
    proto.RankStep: [
        proto.RankStep(0, 1),
        proto.RankStep(9, 3, step_time=0.02, forward_time=0.018, stall_time=0.001, bytes_to_device=1 << 33,
                       bytes_to_host=8192, num_staging_blocks=48),
    ],
    proto.HostSegmentInfo: [proto.HostSegmentInfo(segment_id=2, pid=4242, fd=17, first_block=128, num_blocks=64)],
    proto.HostLease: [
        proto.HostLease(0),
        proto.HostLease(
            96,
            attach=[proto.HostSegmentInfo(1, 4242, 18, 64, 32)],
            detach=[3, 4],
            target=100,
            reason="grow: demand, stalls 0.3% < 2%",
            link_bandwidth=2.4e10,
            lease_id=7,
        ),
    ],
    proto.PrefetchCommand: [proto.PrefetchCommand(1, 48), proto.PrefetchCommand(3, 200, reason="link 512 MB/s, compute 4 ms")],
    proto.SegmentUpdate: [proto.SegmentUpdate(), proto.SegmentUpdate([proto.HostSegmentInfo(0, 1, 9, 0, 64)], [2])],
    proto.DemandReport: [
        proto.DemandReport(0, 0, 0, False, 0),
        proto.DemandReport(3, 7, 40, True, 64, release_safe=True, host_blocks_high_water=52),
        proto.DemandReport(2, 0, 8, True, 8, idle=True, step_time=0.025, link_bandwidth=8e9),
        proto.DemandReport(0, 0, 0, False, 0, release_safe=True, lease_id=12),
    ],
    proto.Ready: [
        proto.Ready("scheduler", 100),
        proto.Ready("executor", 101, num_device_blocks=512, max_model_len=2048, eos_token_ids=[2, 4],
                    block_size=16, vocab_size=49152, max_host_blocks=1024),
    ],
    proto.Heartbeat: [proto.Heartbeat("executor", 0), proto.Heartbeat("scheduler", 12, time=12345.678)],
    proto.Shutdown: [proto.Shutdown(), proto.Shutdown(reason="the executor died")],
    proto.Dead: [proto.Dead("executor", "RuntimeError: boom")],
    proto.Stats: [
        proto.Stats(),
        proto.Stats(num_running=3, num_waiting=1, num_device_blocks=64, num_host_blocks=32, device_usage=0.5,
                    host_usage=0.25, num_preemptions=2, num_steps=99, cycle_seconds_total=1.5, forward_seconds_total=1.4,
                    step_seconds_total=1.45, host_lease=32, bytes_to_device_total=1 << 40, bytes_to_host_total=1 << 20,
                    stall_seconds_total=0.01, host_lease_target=40, host_decision="shrink: stalls 5.1% > 2%",
                    host_link_bandwidth=2.4e10, prefix_cache_queries_total=640, prefix_cache_device_hits_total=256,
                    prefix_cache_host_hits_total=64, num_computed_tokens_total=4096, prefix_cache_demotions_total=8,
                    prefix_cache_promotions_total=2, num_host_blocks_used=12,
                    iteration_tokens_bucket_counts=[0, 5, 3] + [0] * 11, num_staging_blocks=48, prefetch_depth=1),
        proto.Stats(num_steps=2, ranks=[proto.RankStats(0, 2, 0.5, 0.4, 0.01, 1 << 34, 4096, 48), proto.RankStats(1)]),
    ],
    proto.RankStats: [proto.RankStats(0), proto.RankStats(1, 7, 0.25, 0.2, 0.0, 1 << 20, 0, 16)],
    proto.plan.HostPlan: [
        proto.plan.HostPlan(),
        proto.plan.HostPlan(max_host_blocks=100, blocks_per_segment=64, num_segments=2, segment_bytes=64 << 20,
                            block_bytes=1 << 20, num_staging_blocks=100, initial_lease=100, pinned=True),
    ],
    proto.plan.EnginePlan: [
        proto.plan.EnginePlan(model_path="/srv/models/llama", device="cpu", dtype="float32", max_model_len=512,
                              num_device_blocks=None, host=proto.plan.HostPlan(), num_layers=2, num_kv_heads=2,
                              head_dim=16),
        proto.plan.EnginePlan(model_path="/m", device="cuda:1", dtype="bfloat16", max_model_len=8192,
                              num_device_blocks=4096, host=proto.plan.HostPlan(max_host_blocks=8, num_segments=1),
                              num_layers=32, num_kv_heads=8, head_dim=128),
    ],
}
ALL_EXAMPLES = [(cls, example) for cls, examples in EXAMPLES.items() for example in examples]
# Messages that travel alone on a socket (tagged) vs. parts of other messages.
TAGGED = [cls for cls in EXAMPLES if cls.__struct_config__.tag is not None]


def proto_structs() -> set[type]:
    found = set()
    for module in (proto.messages, proto.control, proto.plan):
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, msgspec.Struct) and value.__module__ == module.__name__:
                found.add(value)
    return found


def test_every_message_has_an_example():
    missing = proto_structs() - set(EXAMPLES)
    assert not missing, f"add round-trip examples for {sorted(cls.__name__ for cls in missing)}"


def test_proto_is_a_leaf_package():
    for module in (proto.messages, proto.control, proto.plan, proto.config):
        source = inspect.getsource(module)
        assert "import pied" not in source and "from pied" not in source
        assert "import workers" not in source and "from workers" not in source


@pytest.mark.parametrize(("cls", "message"), ALL_EXAMPLES, ids=lambda value: getattr(value, "__name__", ""))
def test_round_trip(cls, message):
    data = msgspec.msgpack.encode(message)
    decoded = msgspec.msgpack.decode(data, type=cls)
    assert decoded == message
    assert type(decoded) is cls
    # A typed Decoder, as each socket uses, gives the same.
    assert msgspec.msgpack.Decoder(cls).decode(data) == message


def test_one_union_decoder_tells_every_tagged_message_apart():
    decoder = msgspec.msgpack.Decoder(Union[tuple(TAGGED)])  # type: ignore[valid-type]
    for cls in TAGGED:
        for message in EXAMPLES[cls]:
            decoded = decoder.decode(msgspec.msgpack.encode(message))
            assert type(decoded) is cls and decoded == message


def test_hot_and_control_messages_are_array_like_untracked_and_omit_defaults():
    hot = [proto.AddRequest, proto.AbortRequests, proto.TokenDelta, proto.TokenDeltas, proto.TokenLogprobs,
           proto.RequestPhases, proto.NewRequestData, proto.StepPlan, proto.StepResult, proto.RankStep,
           proto.HostSegmentInfo, proto.RankStats]
    control = [proto.Ready, proto.Heartbeat, proto.Shutdown, proto.Dead, proto.Stats]
    for cls in hot + control:
        config = cls.__struct_config__
        assert config.array_like and config.omit_defaults and not config.gc, cls.__name__
    for cls in control:
        assert cls.__struct_config__.tag == cls.__name__


def test_packed_arrays_are_int32_little_endian_and_zero_copy():
    ids = np.array([0, 1, -1, 2**31 - 1, -(2**31)], dtype=np.int64)
    packed = pack_i32(ids)
    assert packed == np.array(ids, dtype="<i4").tobytes() and len(packed) == 4 * len(ids)
    plan = msgspec.msgpack.decode(
        msgspec.msgpack.encode(proto.StepPlan(1, ["r"], packed, packed, packed, packed, packed, b"\x01")),
        type=proto.StepPlan,
    )
    view = unpack_i32(plan.token_ids)
    assert view.dtype == np.dtype("<i4") and view.tolist() == ids.tolist()
    assert not view.flags.writeable  # a view of the received bytes, not a copy
    assert unpack_f32(pack_f32([0.5, -2.0])).tolist() == [0.5, -2.0]
    # Packed bytes travel as one msgpack bin, not as a list of ints: size is 4 bytes a token plus a header.
    big = proto.AddRequest("r", pack_i32(np.arange(100_000)), GREEDY)
    assert len(msgspec.msgpack.encode(big)) < 4 * 100_000 + 128


def test_default_omission():
    # Map-encoded structs send only the fields that differ from their defaults.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(GREEDY)) == {"temperature": 0.0, "max_tokens": 8}
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(SamplingParams())) == {}
    # Array-like structs are positional: msgspec (0.22) writes every field, defaults included, so
    # field order is the whole wire contract. Decoding still fills trailing fields a sender left
    # out with their defaults (see test_old_senders_are_understood).
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(proto.Heartbeat("x", 3))) == ["Heartbeat", "x", 3, 0.0]
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(proto.TokenDelta("r", b"\x05\x00\x00\x00")))[:3] == [
        "r",
        b"\x05\x00\x00\x00",
        None,
    ]


def test_old_senders_are_understood():
    # Fields added last with defaults keep the wire compatible: a message without them decodes.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(["Stats", 1, 2]), type=proto.Stats) == proto.Stats(
        num_running=1, num_waiting=2
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(["Ready", "executor", 7]), type=proto.Ready) == proto.Ready(
        "executor", 7
    )


def test_enums_travel_as_ints():
    for reason in FinishReason:
        delta = proto.TokenDelta("r", b"", finish_reason=reason)
        raw = msgspec.msgpack.decode(msgspec.msgpack.encode(delta))
        assert raw[2] == int(reason)
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(delta), type=proto.TokenDelta)
        assert decoded.finish_reason is reason
    assert [str(reason) for reason in FinishReason] == ["stop", "length", "abort", "error"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(["r", b"", 9]), type=proto.TokenDelta)


def test_wrong_messages_are_rejected_not_guessed():
    decoder = msgspec.msgpack.Decoder(Union[proto.StepPlan, proto.Shutdown])
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode(proto.Heartbeat("x", 1)))
    with pytest.raises(msgspec.DecodeError):
        decoder.decode(b"\xc1")  # never valid msgpack


# ---------------------------------------------------------------- golden bytes
#
# The exact msgpack bytes of every example, stored in tests/golden/wire_messages.json. A reordered,
# renamed, retyped or removed field changes them, so a wire-format change cannot pass unnoticed: it
# updates proto/, its examples and these bytes in the same commit. Regenerate after a deliberate
# change with `PIED_WRITE_GOLDEN=1 python -m pytest tests/test_proto.py -k golden`.
GOLDEN_FILE = Path(__file__).parent / "golden" / "wire_messages.json"


def golden_encodings() -> dict[str, str]:
    return {
        f"{cls.__module__}.{cls.__qualname__}[{index}]": msgspec.msgpack.encode(message).hex()
        for cls, messages in EXAMPLES.items()
        for index, message in enumerate(messages)
    }


def test_wire_bytes_equal_the_golden_fixtures():
    encodings = golden_encodings()
    if os.environ.get("PIED_WRITE_GOLDEN"):
        GOLDEN_FILE.write_text(json.dumps(encodings, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN_FILE.read_text())
    assert sorted(encodings) == sorted(golden), "examples added or removed: regenerate the golden file"
    changed = [name for name in encodings if encodings[name] != golden[name]]
    assert not changed, f"wire bytes changed for {changed}: a wire-format change (see the note above)"


def test_golden_bytes_catch_a_reordered_field():
    """The fixture check can fail: the same fields in another order give other bytes."""
    fields = [
        (field.name, field.type)
        if field.required
        else (field.name, field.type, msgspec.field(default=field.default, default_factory=field.default_factory))
        for field in msgspec.structs.fields(proto.TokenDelta)
    ]
    swapped = [fields[1], fields[0], *fields[2:]]
    Reordered = msgspec.defstruct("TokenDelta", swapped, array_like=True, omit_defaults=True)
    original = proto.TokenDelta("r0", pack_i32([5]))
    reordered = Reordered(token_ids=original.token_ids, request_id="r0")
    golden = json.loads(GOLDEN_FILE.read_text())
    assert msgspec.msgpack.encode(original).hex() == golden["proto.messages.TokenDelta[0]"]
    assert msgspec.msgpack.encode(reordered).hex() != golden["proto.messages.TokenDelta[0]"]


def test_choices_of_a_request_share_its_prompt_and_lists():
    params = SamplingParams(n=3, seed=7, stop_token_ids=[5, 6], allowed_token_ids=[1, 2, 5, 6])
    request = proto.AddRequest("r", pack_i32([1, 2, 3]), params, 1.5, "00-trace")
    choices = request.choices()
    assert [choice.request_id for choice in choices] == ["r-0", "r-1", "r-2"]
    assert [choice.params.seed for choice in choices] == [7, 8, 9]  # distinct, reproducible
    assert all(choice.params.n == 1 for choice in choices)
    for choice in choices:  # shared, not copied
        assert choice.prompt_token_ids is request.prompt_token_ids
        assert choice.params.stop_token_ids is params.stop_token_ids
        assert choice.params.allowed_token_ids is params.allowed_token_ids
        assert (choice.arrival_time, choice.trace_context) == (1.5, "00-trace")
    unseeded = proto.AddRequest("u", pack_i32([1]), SamplingParams(n=2))
    assert [choice.params.seed for choice in unseeded.choices()] == [None, None]
    single = proto.AddRequest("s-0", pack_i32([1]), SamplingParams())
    assert single.choices() == [single] and single.choices()[0] is single
