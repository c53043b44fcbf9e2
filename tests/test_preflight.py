"""The preflight: every bad setting and broken model folder is refused by the daemon before any
worker starts — through the real CLI (``python -m pied serve`` and ``pied generate``): exit status 2,
one line ``pied: <flag/key/file>: ...`` on stderr, no traceback, and no process or /dev/shm entry
left behind. Past the preflight, a failure exits 1 whatever its type. Unit tests for the pure checks
and for the plan reaching the workers follow."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from daemon import cmdline, shm_entries, worker_pids
from server import REPO, running_server

from pied.devices import resolve_device
from pied.model_folder import check_config_fields, check_model_folder, check_safetensors_header, weight_files
from pied.preflight import preflight
from proto.config import ConfigError, EngineConfig, parse_expansion
from proto.plan import EnginePlan, HostPlan
from workers.memory.host_plan import GIB, plan_host
from workers.model_config import ModelConfig, ModelFolderError
from workers.plan import plan_engine

CLI_TIMEOUT = 120  # a deadline for a loaded machine, not a measure of speed
MARKER = "PIED_PREFLIGHT_TEST_MARKER"


# ---------------------------------------------------------------- helpers


def copy_model(tiny_model_dir, tmp_path: Path, **build) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama", **build), folder)
    return folder


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    file.write_text(json.dumps(data))


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (every descendant of the CLI inherits it)."""
    found = []
    needle = f"{MARKER}={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state not in "ZX":
            found.append(int(entry))
    return found


def run_cli(*argv: str, script: str | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
    """``python -m pied *argv`` (or ``python -c script *argv``); returns the result and its marker."""
    marker = uuid.uuid4().hex
    command = [sys.executable, "-m", "pied", *argv] if script is None else [sys.executable, "-c", script, *argv]
    result = subprocess.run(
        command,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env={**os.environ, MARKER: marker, "PYTHONUNBUFFERED": "1"},
    )
    return result, marker


def assert_refused(command: str, flags: list[str], *named: str) -> str:
    """``pied COMMAND FLAGS`` exits 2 with one line naming each of ``named``, and leaves nothing."""
    shm_before = shm_entries()
    extra = ["--port", "0"] if command == "serve" else ["--max-tokens", "1"]
    result, marker = run_cli(command, *flags, *extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("pied: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for text in named:
        assert text in lines[0], lines[0]
    assert marked_processes(marker) == []  # no worker was ever started, none is left
    assert shm_entries() <= shm_before
    return lines[0]


COMMANDS = ["serve", "generate"]


@pytest.fixture
def model(tiny_model_dir, tmp_path) -> Path:
    return copy_model(tiny_model_dir, tmp_path)


# ---------------------------------------------------------------- bad flags, through the CLI


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_expansion(model, command):
    assert_refused(command, ["--model", str(model), "--kv-policy", "pie", "--expansion", "fixed:lots"], "--expansion")


@pytest.mark.parametrize("command", COMMANDS)
def test_host_kv_gib_above_available_memory(model, command):
    line = assert_refused(
        command, ["--model", str(model), "--kv-policy", "pie", "--host-kv-gib", "100000"], "--host-kv-gib"
    )
    assert "available" in line


def test_an_address_that_cannot_be_listened_on_is_refused_before_any_worker(model):
    # Not this machine's (TEST-NET-1): a configuration error, one line, exit 2.
    assert_refused("serve", ["--model", str(model), "--host", "192.0.2.1"], "--host 192.0.2.1")
    assert_refused("serve", ["--model", str(model), "--host", "no-such-host.invalid"], "--host")
    # A port in use may come free: exit 1 (worth a restart), but before any worker loads the model.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, marker = run_cli("serve", "--model", str(model), "--port", str(port))
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].endswith("Address already in use")
    assert "Traceback" not in result.stderr and marked_processes(marker) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_host_kv_gib_zero_with_a_host_policy(model, command):
    # 0 read as "unset" had given pie the 1 GiB default and half the device blocks for its ring.
    assert_refused(command, ["--model", str(model), "--kv-policy", "pie", "--host-kv-gib", "0"], "--host-kv-gib 0")


@pytest.mark.parametrize("command", COMMANDS)
def test_prefetch_depth_zero(model, command):
    assert_refused(command, ["--model", str(model), "--prefetch-depth", "0"], "--prefetch-depth")


@pytest.mark.parametrize("command", COMMANDS)
def test_device_kv_blocks_too_small_for_one_sequence(model, command):
    line = assert_refused(
        command,
        ["--model", str(model), "--block-size", "4", "--device-kv-blocks", "8", "--max-model-len", "64"],
        "--device-kv-blocks",
        "--max-model-len",
    )
    assert "16 blocks" in line  # what one sequence needs


@pytest.mark.parametrize("command", COMMANDS)
def test_max_model_len_beyond_the_model(model, command):
    assert_refused(command, ["--model", str(model), "--max-model-len", "4096"], "--max-model-len", "512")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_cuda_device(model, command):
    if resolve_device("auto") != "cpu":
        pytest.skip("a CUDA device is visible here")
    assert_refused(command, ["--model", str(model), "--device", "cuda"], "--device cuda")


def test_bad_key_in_the_config_file(model, tmp_path):
    config = tmp_path / "pied.toml"
    config.write_text(f'model = "{model}"\nkv-policy = "pie"\nexpansion = "fixed:-3"\n')
    assert_refused("serve", ["--config", str(config)], f"pied: {config}: expansion: ", "fixed:-3")
    config.write_text(f'model = "{model}"\nstall-target = 1.5\n')
    assert_refused("serve", ["--config", str(config)], f"pied: {config}: stall-target: ")
    # The same value on the command line is the flag's.
    assert_refused("serve", ["--config", str(config), "--stall-target", "2"], "pied: --stall-target ")


# ---------------------------------------------------------------- broken model folders, through the CLI


@pytest.mark.parametrize("command", COMMANDS)
def test_config_json_missing(model, command):
    (model / "config.json").unlink()
    assert_refused(command, ["--model", str(model)], str(model / "config.json"))


@pytest.mark.parametrize("command", COMMANDS)
def test_config_json_not_json(model, command):
    (model / "config.json").write_text('{"hidden_size": 64,')
    assert_refused(command, ["--model", str(model)], str(model / "config.json"), "invalid JSON")


@pytest.mark.parametrize("command", COMMANDS)
def test_config_field_of_the_wrong_type(model, command):
    edit_json(model / "config.json", num_key_value_heads="2")
    assert_refused(command, ["--model", str(model)], str(model / "config.json"), "'num_key_value_heads'")


@pytest.mark.parametrize("command", COMMANDS)
def test_inconsistent_heads(model, command):
    edit_json(model / "config.json", num_key_value_heads=3)
    assert_refused(command, ["--model", str(model)], str(model / "config.json"), "num_key_value_heads (3)")


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_architecture(model, command):
    edit_json(model / "config.json", architectures=["FancyNewForCausalLM"])
    assert_refused(command, ["--model", str(model)], str(model / "config.json"), "FancyNewForCausalLM")


@pytest.fixture
def sharded(tiny_model_dir, tmp_path) -> Path:
    return copy_model(tiny_model_dir, tmp_path, sharded=True)


def shard_names(folder: Path) -> list[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def rename_shard(folder: Path, old: str, new: str) -> None:
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("command", COMMANDS)
def test_shard_path_escaping_the_folder(sharded, command):
    first = shard_names(sharded)[0]
    shutil.copy(sharded / first, sharded.parent / first)  # a real file is there, outside
    rename_shard(sharded, first, f"../{first}")
    assert_refused(command, ["--model", str(sharded)], "model.safetensors.index.json", "leaves the model folder")


@pytest.mark.parametrize("command", COMMANDS)
def test_shard_symlinked_out_of_the_folder(sharded, command):
    first = shard_names(sharded)[0]
    outside = sharded.parent / "elsewhere.safetensors"
    shutil.move(sharded / first, outside)
    (sharded / first).symlink_to(outside)
    assert_refused(command, ["--model", str(sharded)], "model.safetensors.index.json", "outside the model folder")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_shard(sharded, command):
    first = shard_names(sharded)[0]
    (sharded / first).unlink()
    assert_refused(command, ["--model", str(sharded)], "model.safetensors.index.json", first)


@pytest.mark.parametrize("command", COMMANDS)
def test_tokenizer_ids_beyond_the_vocabulary(model, command):
    # The tokenizer knows 512 ids (0..511); the model claims 300 embedding rows.
    edit_json(model / "config.json", vocab_size=300)
    assert_refused(command, ["--model", str(model)], str(model / "tokenizer.json"), "511", "300")


# ---------------------------------------------------------------- past the preflight: exit 1


RAISE_AFTER_SERVING = textwrap.dedent(
    """
    import sys
    from pied import sdnotify
    from pied.cli import main

    def ready(self, status=""):  # called once the daemon listens
        raise ValueError("a ValueError while serving")

    sdnotify.Notifier.ready = ready
    sys.exit(main(sys.argv[1:]))
    """
)


def test_value_error_while_serving_exits_1(tiny_model_dir):
    result, marker = run_cli(
        "serve", "--model", str(tiny_model_dir("llama")), "--port", "0", script=RAISE_AFTER_SERVING
    )
    assert "pied: listening on" in result.stdout, result.stderr  # it was serving
    assert result.returncode == 1, result.stderr
    assert "a ValueError while serving" in result.stderr
    deadline = time.monotonic() + 60
    while marked_processes(marker):  # the workers follow their parent out
        assert time.monotonic() < deadline, f"left behind: {marked_processes(marker)}"
        time.sleep(0.1)


def test_config_error_after_the_preflight_exits_1(tiny_model_dir):
    """A ConfigError raised at run time (here: starting the engine in pied generate) is not a
    configuration error of the command line: exit 1."""
    script = textwrap.dedent(
        """
        import sys
        import pied.llm
        from proto.config import ConfigError

        def start(self, **kwargs):
            raise ConfigError("raised while starting the engine")

        pied.llm.LLM.__init__ = start
        from pied.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    result, _ = run_cli("generate", "--model", str(tiny_model_dir("llama")), "--max-tokens", "1", script=script)
    assert result.returncode == 1, result.stderr
    assert "pied: failed at run time: raised while starting the engine" in result.stderr


def test_systemd_does_not_restart_on_exit_2():
    unit = (REPO / "packaging" / "systemd" / "pied.service").read_text()
    settings = [line.strip() for line in unit.splitlines() if not line.lstrip().startswith("#")]
    assert "RestartPreventExitStatus=2" in settings and "Restart=on-failure" in settings


# ---------------------------------------------------------------- the pure checks


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(expansion="fixed:"), "--expansion"),
        (dict(expansion="fixed:0"), "--expansion fixed:0"),
        (dict(expansion="Adaptive"), "--expansion"),
        (dict(prefetch_depth=0), "--prefetch-depth"),
        (dict(stall_target=0.0), "--stall-target"),
        (dict(stall_target=1.0), "--stall-target"),
        (dict(gpu_memory_utilization=0.0), "--gpu-memory-utilization"),
        (dict(gpu_memory_utilization=1.5), "--gpu-memory-utilization"),
        (dict(host_kv_gib=-1.0), "--host-kv-gib"),
        (dict(host_kv_gib=float("nan")), "--host-kv-gib"),
        (dict(host_kv_gib=4.0), "--host-kv-gib 4 is host memory for --kv-policy pie or swap"),  # policy none
        (dict(device_kv_gib=float("inf")), "--device-kv-gib"),
        (dict(device_kv_blocks=4, device_kv_gib=1.0), "--device-kv-blocks and --device-kv-gib"),
        (dict(device="gpu"), "--device"),
        (dict(device="cuda:x"), "--device"),
        (dict(dtype="int8"), "--dtype"),
        (dict(block_size=12), "--block-size"),
        (dict(seed=1 << 64), "--seed"),
        (dict(max_logprobs=-1), "--max-logprobs"),
        (dict(served_model_name=" "), "--served-model-name"),
        (dict(max_num_seqs="8"), "--max-num-seqs must be an integer"),
        (dict(enable_prefix_caching=1), "--enable-prefix-caching must be true or false"),
        (dict(host_kv_gib=True), "--host-kv-gib must be a number"),
        (dict(max_model_len=2.5), "--max-model-len must be an integer or None"),
    ],
)
def test_validate_names_the_flag(changes, flag):
    with pytest.raises(ConfigError, match="^" + flag.replace("(", r"\(")):
        EngineConfig(**changes).validate()


def test_validate_accepts_the_defaults_and_ints_for_floats():
    EngineConfig().validate()
    EngineConfig(kv_policy="pie", host_kv_gib=2, expansion="fixed:16", device="cuda:1", gpu_memory_utilization=1).validate()
    assert parse_expansion("adaptive") is None and parse_expansion("fixed:16") == 16


def test_replace_drops_the_plan(tiny_model_dir):
    config = preflight(EngineConfig(model=str(tiny_model_dir("llama")), device="cpu"))
    assert config.plan is not None and preflight(config) is config  # a planned config is not checked again
    assert config.replace(max_model_len=8).plan is None


def test_resolve_device():
    assert resolve_device("cpu", num_devices=0) == "cpu"
    assert resolve_device("auto", num_devices=0) == "cpu"
    assert resolve_device("auto", num_devices=2) == "cuda"
    assert resolve_device("cuda:1", num_devices=2) == "cuda:1"
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        resolve_device("cuda:2", num_devices=2)
    with pytest.raises(ConfigError, match="no CUDA device is visible"):
        resolve_device("cuda", num_devices=0)


def test_host_plan_segments_and_limits():
    config = EngineConfig(kv_policy="pie", expansion="fixed:100")
    plan = plan_host(config, block_bytes=1 << 20, pinned=False, available=1 << 40)
    assert (plan.max_host_blocks, plan.blocks_per_segment, plan.num_segments) == (100, 64, 2)
    assert plan.segment_bytes == 64 << 20 and plan.num_staging_blocks == 100 and plan.initial_lease == 100
    swap = plan_host(EngineConfig(kv_policy="swap", host_kv_gib=0.5), 1 << 20, pinned=False, available=1 << 40)
    assert swap.max_host_blocks == 512 and swap.num_staging_blocks == 0
    assert plan_host(EngineConfig(), 1 << 20, pinned=True) == HostPlan()
    with pytest.raises(ConfigError, match="--expansion fixed:100: the host KV pool needs"):
        plan_host(config, 1 << 20, pinned=False, available=50 << 20)
    # --host-kv-gib caps the fixed lease too (100 MiB of blocks above a 64 MiB cap); within it, fine.
    capped = EngineConfig(kv_policy="pie", expansion="fixed:100", host_kv_gib=1 / 16)
    with pytest.raises(ConfigError, match=r"fixed:100 needs .* above --host-kv-gib 0.0625: lower N to 64"):
        plan_host(capped, 1 << 20, pinned=False, available=1 << 40)
    assert plan_host(capped.replace(expansion="fixed:64"), 1 << 20, pinned=False, available=1 << 40).max_host_blocks == 64
    # On CUDA: 512 MiB segments, and no memlock refusal (the executor probes by registering).
    cuda = plan_host(EngineConfig(kv_policy="pie", host_kv_gib=2), 1 << 20, pinned=True, available=1 << 40)
    assert (cuda.blocks_per_segment, cuda.num_segments, cuda.segment_bytes, cuda.pinned) == (512, 4, 512 << 20, True)
    assert plan_host(config, 1 << 20, pinned=True, available=1 << 40).blocks_per_segment == 100
    with pytest.raises(ConfigError, match="--host-kv-gib 1e-06 holds no host KV block"):
        plan_host(EngineConfig(kv_policy="pie", host_kv_gib=1e-6), 1 << 20, pinned=False)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> ModelConfig:
    return ModelConfig.from_folder(tiny_model_dir("llama"))


def test_plan_sizes_the_device_pool_and_the_model_length(tiny):
    # 2 layers x 2 (K, V) x 4 tokens x 2 KV heads x 16 dims x 4 bytes = 2 KiB per block.
    base = dict(model=str(tiny.path), dtype="float32", block_size=4)
    plan = plan_engine(EngineConfig(**base, device_kv_gib=1 / 1024), tiny, "cpu")
    assert (plan.num_device_blocks, plan.max_model_len, plan.dtype, plan.device) == (512, 512, "float32", "cpu")
    # A staging ring of 2 areas x 64 pages (1 KiB each) comes out of the budget.
    pie = EngineConfig(**base, device_kv_gib=1 / 1024, kv_policy="pie", expansion="fixed:64")
    assert plan_engine(pie, tiny, "cpu", available=1 << 40).num_device_blocks == 512 - 64
    # Without --max-model-len the model length is what the pool holds; with it, a refusal.
    assert plan_engine(EngineConfig(**base, device_kv_blocks=26), tiny, "cpu").max_model_len == 104
    with pytest.raises(ConfigError, match="--max-model-len 512 does not fit"):
        plan_engine(EngineConfig(**base, device_kv_blocks=26, max_model_len=512), tiny, "cpu")
    # Under pie the host lease counts: 26 + 102 blocks hold 512 tokens.
    pooled = EngineConfig(**base, device_kv_blocks=26, kv_policy="pie", expansion="fixed:102", max_model_len=512)
    assert plan_engine(pooled, tiny, "cpu", available=1 << 40).max_model_len == 512
    with pytest.raises(ConfigError, match="--max-num-batched-tokens"):
        plan_engine(EngineConfig(**base, enable_chunked_prefill=False, max_num_batched_tokens=64), tiny, "cpu")
    # CUDA without a size: the executor decides after loading the weights.
    assert plan_engine(EngineConfig(**base), tiny, "cuda", available=1 << 40).num_device_blocks is None
    with pytest.raises(ConfigError, match="holds no KV block"):
        plan_engine(EngineConfig(**base, device_kv_gib=1e-9), tiny, "cpu")


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hidden_size="64"), "'hidden_size' must be a positive integer"),
        (dict(vocab_size=None), "'vocab_size' is missing"),
        (dict(num_hidden_layers=0), "'num_hidden_layers' must be a positive integer"),
        (dict(head_dim=1.5), "'head_dim' must be a positive integer or null"),
        (dict(rms_norm_eps="1e-6"), "'rms_norm_eps' must be a positive number"),
        (dict(tie_word_embeddings="no"), "'tie_word_embeddings' must be true or false"),
        (dict(eos_token_id=[2, "3"]), "'eos_token_id' must be a token id"),
        (dict(hidden_size=66, head_dim=None), "hidden_size (66) must be a multiple of num_attention_heads (4)"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads (3)"),
        (dict(architectures="LlamaForCausalLM"), "'architectures' must be a list"),
        (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel is not supported"),
        # The architecture is the answer, not a field it has that ours would misread.
        (dict(architectures=["Qwen2MoeForCausalLM"], sliding_window=0), "Qwen2MoeForCausalLM is not supported"),
        (dict(sliding_window=0), "'sliding_window' must be a positive integer or null"),
        (dict(sliding_window=False, use_sliding_window=False), "'sliding_window' must be a positive integer"),
        (dict(torch_dtype="int4"), "torch_dtype 'int4' is not supported"),
    ],
)
def test_config_fields(tiny, changes, message):
    raw = json.loads((Path(tiny.path) / "config.json").read_text())
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelFolderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config_fields(raw, Path("config.json"))


def test_an_unused_sliding_window_may_be_zero(tiny):
    # transformers 5 saves a Qwen2 without sliding as use_sliding_window false, sliding_window 0.
    raw = json.loads((Path(tiny.path) / "config.json").read_text())
    check_config_fields({**raw, "sliding_window": 0, "use_sliding_window": False}, Path("config.json"))


def test_head_dim_may_differ_from_hidden_over_heads(tiny):
    raw = json.loads((Path(tiny.path) / "config.json").read_text())
    check_config_fields({**raw, "hidden_size": 66, "head_dim": 16}, Path("config.json"))


@pytest.mark.parametrize("name", ["/etc/passwd", "../model.safetensors", "a/../../b.safetensors"])
def test_shard_names_stay_inside(sharded, name):
    rename_shard(sharded, shard_names(sharded)[0], name)
    with pytest.raises(ModelFolderError, match="leaves the model folder"):
        weight_files(sharded)


def test_hugging_face_cache_symlinks_are_inside(model, tmp_path):
    """A cache snapshot links its files to ../../blobs/: that is the same repository."""
    repository = tmp_path / "hub" / "models--x--tiny"
    snapshot = repository / "snapshots" / "abc123"
    (repository / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in model.iterdir():
        shutil.move(file, repository / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    check_model_folder(snapshot)
    assert preflight(EngineConfig(model=str(snapshot), device="cpu")).plan is not None


def test_truncated_safetensors_header(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFolderError, match="corrupt safetensors header"):
        check_safetensors_header(weights)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_checkpoint_missing_a_tensor_is_refused_before_any_worker(model, command):
    from safetensors.torch import load_file, save_file

    weights = model / "model.safetensors"
    tensors = load_file(weights)
    assert "lm_head.weight" in tensors  # untied: the checkpoint must hold it
    del tensors["lm_head.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights)
    line = assert_refused(command, ["--model", str(model)], str(weights), "missing tensors")
    assert "lm_head.weight" in line and "model.layers.1.mlp.up_proj.weight" in line


def test_the_tensors_a_folder_must_hold_are_the_ones_the_model_loads(tiny_model_dir):
    """``ModelConfig.checkpoint_tensor_names`` (torch-free, for the preflight) against the model's
    own ``checkpoint_targets`` (what the loader fills), built on the meta device."""
    import torch

    from workers.executor.model import CausalLM

    variants = [
        ("llama", {}), ("llama", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
        ("mistral", {}), ("qwen2", {}), ("qwen3", dict(attention_bias=True)), ("phi3", {}),
        ("gemma3", {}), ("smollm3", {}), ("gemma3-multimodal", {}),
    ]  # fmt: skip
    for arch, overrides in variants:
        config = ModelConfig.from_folder(tiny_model_dir(arch, **overrides))
        with torch.device("meta"):
            targets = CausalLM(config, torch.float32).checkpoint_targets()
        assert config.checkpoint_tensor_names() == set(targets), (arch, overrides)


def test_llm_refuses_before_starting_anything(model):
    from pied import LLM

    with pytest.raises(ConfigError, match="--prefetch-depth"):
        LLM(model=str(model), prefetch_depth=0)
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelFolderError, match="tokenizer.json"):
        LLM(model=str(model))


# ---------------------------------------------------------------- the plan reaches the workers


def test_the_plan_travels_in_worker_args(tiny):
    from workers.actor import Addresses, WorkerArgs

    config = preflight(EngineConfig(model=str(tiny.path), device="cpu", kv_policy="pie", expansion="fixed:8"))
    args = WorkerArgs(config=config, addresses=Addresses.inproc())
    decoded = msgspec.json.decode(msgspec.json.encode(args), type=WorkerArgs)
    assert isinstance(decoded.config.plan, EnginePlan) and decoded.config.plan == config.plan


def test_workers_build_from_the_plan_not_from_the_config(tiny):
    """The memory manager and the executor take the plan as given (here one that the config alone
    would not give), so they cannot disagree with it or with each other."""
    from workers.executor.runner import ModelRunner
    from workers.memory.manager import HostMemory

    config = preflight(
        EngineConfig(model=str(tiny.path), device="cpu", block_size=4, kv_policy="pie", expansion="fixed:12")
    )
    assert config.plan is not None
    host = msgspec.structs.replace(config.plan.host, blocks_per_segment=5, num_segments=3)
    plan = msgspec.structs.replace(config.plan, num_device_blocks=7, max_model_len=40, host=host)
    planned = EngineConfig(**{**config.__dict__, "plan": plan})
    memory = HostMemory(planned)
    try:
        change = memory.start()
        assert [segment.num_blocks for segment in change.attach] == [5, 5, 2]
    finally:
        memory.close()
    runner = ModelRunner(planned)
    try:
        assert (runner.num_device_blocks, runner.max_model_len, runner.num_staging_blocks) == (7, 40, 12)
        assert runner.host_kv.pool.blocks_per_segment == 5
    finally:
        runner.close()


def test_host_plan_is_checked_once_in_the_daemon(tiny, monkeypatch):
    """A worker given a plan never looks at the machine's memory again."""
    import workers.memory.host_plan as host_plan_module

    config = preflight(EngineConfig(model=str(tiny.path), device="cpu", kv_policy="swap", host_kv_gib=0.001))
    monkeypatch.setattr(host_plan_module, "available_memory_bytes", lambda: 0)
    from workers.memory.manager import HostMemory

    memory = HostMemory(config)  # would refuse if it planned again with 0 bytes available
    memory.close()
    with pytest.raises(ConfigError, match="only 0.00 GiB"):
        HostMemory(config.replace())


def test_cpu_default_budget_in_gib(tiny):
    config = preflight(EngineConfig(model=str(tiny.path), device="cpu", block_size=4))
    assert config.plan is not None and config.plan.num_device_blocks == int(1 * GIB // 2048)


def test_the_daemon_hands_its_plan_to_every_worker(tiny_model_dir):
    """The workers of ``pied serve`` get the checked plan on their command line (WorkerArgs JSON):
    the device pool, the model length lowered to it, and the host plan, as the preflight decided."""
    from workers.actor import WorkerArgs

    model_dir = tiny_model_dir("llama")
    flags = ["--block-size", "4", "--device-kv-blocks", "40", "--kv-policy", "pie", "--expansion", "fixed:24"]
    with running_server(model_dir, *flags) as server:
        workers = worker_pids(server.process.pid)
        assert set(workers) == {"scheduler", "executor", "memory"}
        plans = []
        for pid in workers.values():
            args = msgspec.json.decode([arg for arg in cmdline(pid) if arg][-1], type=WorkerArgs)
            plans.append(args.config.plan)
        assert plans[0] is not None and plans.count(plans[0]) == len(plans)
        plan = plans[0]
        assert (plan.device, plan.num_device_blocks, plan.max_model_len) == ("cpu", 40, (40 + 24) * 4)
        assert (plan.host.max_host_blocks, plan.host.num_staging_blocks, plan.host.initial_lease) == (24, 24, 24)
        assert plan.model_path == str(Path(model_dir).absolute())
