"""vLLM's command-line habits on ``pied serve`` / ``pied generate``: the positional MODEL, a model id
resolved from the local Hugging Face cache only (a fake cache laid out as huggingface_hub lays it
out), ``--generation-config auto|vllm|FOLDER`` (through HTTP: the model's defaults apply, a request's
own values win), several ``--served-model-name``s, the aliases ``--otlp-traces-endpoint`` and
``--kv-offloading-size``, and ``--trust-remote-code`` refused."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
from server import running_server

from pied import config_file
from pied.args import engine_config_from_args
from pied.cli import build_parser, main
from pied.generation_config import load_generation_defaults
from pied.model_folder import hub_cache_dir, resolve_model_folder
from pied.preflight import preflight
from proto.config import ConfigError, EngineConfig
from workers.model_config import ModelFolderError

REPO_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 3, "top_k": 50}


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path, generation: dict | None = None) -> Path:
    """``model_dir`` stored in ``cache`` as huggingface_hub stores a download: files in ``blobs/`` by
    hash, ``snapshots/<rev>/`` of links to them, ``refs/main`` naming the revision. The snapshot."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / REVISION
    (storage / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {path.name: path.read_bytes() for path in model_dir.iterdir() if path.is_file()}
    if generation is not None:
        files["generation_config.json"] = json.dumps(generation).encode()
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (storage / "blobs" / digest).write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", digest))
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REVISION)  # the hub writes it without a newline
    return snapshot


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test: a model id resolves from the disk only."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def parse(*argv: str):
    return build_parser().parse_args(["generate", *argv])


# ---------------------------------------------------------------- the model: positional, or an id in the cache


def test_positional_model_is_the_model(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    assert engine_config_from_args(parse(model)).model == model
    assert engine_config_from_args(parse(model, "--model", model)).model == model


def test_positional_model_and_a_different_model_flag_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "/models/a", "--model", "/models/b"]) == 2
    error = capsys.readouterr().err
    assert "--model '/models/b' and the positional MODEL '/models/a' differ" in error
    assert "Traceback" not in error


def test_positional_model_wins_over_the_config_file(tmp_path: Path, tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    parser = build_parser()
    args = parser.parse_args(["serve", model])
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    (tmp_path / "pied.toml").write_text('model = "/from/the/file"\n')
    from pied.args import check_vllm_args

    check_vllm_args(args)
    config_file.apply(serve, args, tmp_path / "pied.toml")
    assert engine_config_from_args(args).model == model


@pytest.mark.parametrize("variable", ["HF_HUB_CACHE", "HF_HOME"])
def test_model_id_resolves_from_the_local_cache(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network, variable: str
) -> None:
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, REPO_ID, tiny_model_dir("llama"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(variable, str(cache if variable == "HF_HUB_CACHE" else tmp_path))
    monkeypatch.chdir(tmp_path)  # so that no folder ./tiny-org/tiny-llama can exist
    assert hub_cache_dir() == cache
    assert resolve_model_folder(REPO_ID) == snapshot
    config = preflight(EngineConfig(model=REPO_ID, device="cpu"))
    assert Path(config.model) == snapshot and config.plan is not None
    assert Path(config.plan.model_path) == snapshot
    assert config.served_model_name == REPO_ID  # served under its id, as vLLM does
    named = preflight(EngineConfig(model=REPO_ID, device="cpu", served_model_name="mine"))
    assert named.served_model_name == "mine"


def test_a_folder_wins_over_the_cache(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub_cache(tmp_path / "hub", REPO_ID, tiny_model_dir("llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    local = tmp_path / "work"
    shutil.copytree(tiny_model_dir("llama"), local / REPO_ID)
    monkeypatch.chdir(local)
    assert resolve_model_folder(REPO_ID) == Path(REPO_ID)


def test_model_id_not_in_the_cache_exits_2_naming_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_network
) -> None:
    cache = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match="Hugging Face cache"):
        resolve_model_folder("nobody/nothing")
    assert main(["generate", "nobody/nothing"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("pied: --model nobody/nothing: no such folder") and str(cache) in error
    assert "never downloads" in error and len(error.splitlines()) == 1


def test_an_incomplete_snapshot_is_not_served(tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, REPO_ID, tiny_model_dir("llama"))
    (snapshot / "model.safetensors").unlink()  # an interrupted download
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelFolderError, match="no weights found"):
        preflight(EngineConfig(model=REPO_ID, device="cpu"))


# ---------------------------------------------------------------- flags


def test_trust_remote_code_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--trust-remote-code"]) == 2
    error = capsys.readouterr().err
    assert "--trust-remote-code: pied never runs code from a model folder" in error
    with pytest.raises(ConfigError, match="never runs code"):
        engine_config_from_args(parse("--trust-remote-code"))


def test_kv_offloading_size_is_host_kv_gib() -> None:
    config = engine_config_from_args(parse("--kv-offloading-size", "2.5"))
    assert config.host_kv_gib == 2.5 and config.kv_policy == "pie"  # vLLM: giving a size turns it on
    swap = engine_config_from_args(parse("--kv-offloading-size", "2", "--kv-policy", "swap"))
    assert swap.host_kv_gib == 2 and swap.kv_policy == "swap"
    same = engine_config_from_args(parse("--kv-offloading-size", "2", "--host-kv-gib", "2"))
    assert same.host_kv_gib == 2
    with pytest.raises(ConfigError, match="--kv-offloading-size 2 and --host-kv-gib 3 differ"):
        engine_config_from_args(parse("--kv-offloading-size", "2", "--host-kv-gib", "3"))


def test_otlp_traces_endpoint_is_otlp_endpoint() -> None:
    config = engine_config_from_args(parse("--otlp-traces-endpoint", "http://127.0.0.1:4318"))
    assert config.otlp_endpoint == "http://127.0.0.1:4318"


def test_config_file_takes_the_aliases_and_several_names(tmp_path: Path) -> None:
    parser = build_parser()
    serve = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    config_file.check_parser(serve)
    path = tmp_path / "pied.toml"
    path.write_text(
        'served-model-name = ["qwen", "qwen-latest"]\notlp-traces-endpoint = "http://127.0.0.1:4318"\n'
        "kv-offloading-size = 4\ngeneration-config = \"vllm\"\n"
    )
    args = parser.parse_args(["serve"])
    config_file.apply(serve, args, path)
    assert args.served_model_name == ["qwen", "qwen-latest"] and args.generation_config == "vllm"
    config = engine_config_from_args(args)
    assert config.otlp_endpoint == "http://127.0.0.1:4318" and config.host_kv_gib == 4
    path.write_text('served-model-name = "one"\n')
    args = parser.parse_args(["serve"])
    config_file.apply(serve, args, path)
    assert args.served_model_name == ["one"]
    path.write_text("served-model-name = [1]\n")
    with pytest.raises(ConfigError, match="served-model-name must be a string"):
        config_file.apply(serve, parser.parse_args(["serve"]), path)


# ---------------------------------------------------------------- --generation-config


def test_generation_config_modes(tiny_model_dir, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    auto = load_generation_defaults("auto", model)
    # top_k 50 is transformers' default, not the model's choice (vLLM's to_diff_dict drops it).
    assert auto.values == {"temperature": 0.0, "max_tokens": 3}
    assert load_generation_defaults("vllm", model).values == {}
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps({"top_p": 0.8, "repetition_penalty": 1.05, "min_p": 0.1}))
    assert load_generation_defaults(str(other), model).values == {"top_p": 0.8, "repetition_penalty": 1.05, "min_p": 0.1}
    assert auto.max_tokens(None, 10, 64) == 3 and auto.max_tokens(7, 10, 64) == 7
    assert auto.max_tokens(None, 62, 64) == 2  # bounded by the context left

    with pytest.raises(ConfigError, match="no generation_config.json"):
        load_generation_defaults(str(tmp_path), model)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_generation_defaults(str(tmp_path / "missing"), model)
    (other / "generation_config.json").write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ConfigError, match="top_p: top_p must be in"):
        load_generation_defaults(str(other), model)
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": "3"}))
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer"):
        load_generation_defaults(str(other), model)


# ---------------------------------------------------------------- through HTTP


@pytest.fixture(scope="module")
def hub_server(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory):
    """``pied serve tiny-org/tiny-llama`` from a fake cache, the model's generation_config.json saying
    temperature 0 and max_new_tokens 3, answering to two names."""
    root = tmp_path_factory.mktemp("hf")
    fake_hub_cache(root / "hub", REPO_ID, tiny_model_dir("llama"), GENERATION_CONFIG)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(root))  # the server process finds the cache through HF_HOME
        patch.delenv("HF_HUB_CACHE", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        with running_server(REPO_ID, "--served-model-name", "first", "second", "--max-model-len", "64") as server:
            yield server


def test_served_model_names(hub_server) -> None:
    models = hub_server.request("GET", "/v1/models").json()
    assert [model["id"] for model in models["data"]] == ["first", "second"]
    assert hub_server.request("GET", "/v1/models/second").json()["id"] == "second"
    body = {"model": "second", "prompt": "The list", "max_tokens": 1}
    answer = hub_server.request("POST", "/v1/completions", body)
    assert answer.status == 200 and answer.json()["model"] == "first"  # responses carry the first name
    missing = hub_server.request("POST", "/v1/completions", {**body, "model": "third"})
    assert missing.status == 404 and missing.json()["error"]["param"] == "model"


def test_generation_config_defaults_apply_and_requests_override_them(hub_server) -> None:
    def complete(**fields):
        body = {"prompt": "The class statement defines", "ignore_eos": True, "seed": 7, **fields}
        response = hub_server.request("POST", "/v1/completions", body)
        assert response.status == 200, response.text
        return response.json()

    default = complete()
    assert default["usage"]["completion_tokens"] == 3  # max_new_tokens
    assert default["choices"][0]["finish_reason"] == "length"
    assert complete(max_tokens=5)["usage"]["completion_tokens"] == 5
    # temperature 0 by default: the greedy tokens, whatever the seed.
    greedy = complete(temperature=0.0)["choices"][0]["text"]
    assert default["choices"][0]["text"] == greedy == complete(seed=8)["choices"][0]["text"]
    sampled = {complete(temperature=1.0, max_tokens=3, seed=seed)["choices"][0]["text"] for seed in range(4)}
    assert sampled != {greedy}  # a request's own temperature wins

    chat = hub_server.request(
        "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    )
    assert chat.status == 200 and chat.json()["usage"]["completion_tokens"] == 3
