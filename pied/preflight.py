"""The preflight: the whole configuration and the model folder checked in the daemon, before any
worker starts (DESIGN.md "Processes").

``pied serve``, ``pied generate`` and ``pied.LLM`` call :func:`preflight` first. It checks every
setting (``EngineConfig.validate``: types and ranges), the tracing settings, the model folder
(:mod:`pied.model_folder`: config.json, weights, tokenizer; a model id ``org/name`` becomes its
folder in the local Hugging Face cache, and the served model name when none is given), the device,
the host plan (host KV against the memory available; the memlock limit is not refused here: on CUDA
the executor probes it by registering the segments) and the device KV budget against the model (one
sequence of the model length fits; ``--max-model-len`` not above the model's), and
returns the config with the derived plan (``proto.plan.EnginePlan``), which the workers build from
without deriving it again. A refusal is a ``ConfigError`` or ``ModelFolderError`` whose message
names the flag, key or file and what to change: the CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pied.devices import num_cuda_devices, resolve_device
from pied.model_folder import check_model_folder, check_tokenizer_vocabulary, resolve_model_folder
from pied.multinode import head_endpoint
from proto.config import EngineConfig
from workers.model_config import ModelFolderError
from workers.plan import check_cuda_ranks, plan_engine


def preflight(config: EngineConfig) -> EngineConfig:
    """``config`` checked, with its plan; a config that carries a plan already is returned as is."""
    if config.plan is not None:
        return config
    # Imported here: `pied --help` and `pied chat` need neither OpenTelemetry nor tokenizers.
    from pied.tokenizer import Tokenizer, TokenizerError
    from workers.tracing import otlp_target, root_sampler

    config.validate()
    if config.nnodes > 1:
        head_endpoint(config)  # where the nodes meet: from the init method or MASTER_ADDR/MASTER_PORT
    otlp_target(config.otlp_endpoint)  # an endpoint or protocol that cannot work
    root_sampler()
    folder = resolve_model_folder(str(config.resolved_model()))
    if folder != Path(config.model).expanduser():  # a model id, found in the Hugging Face cache
        # vLLM serves a model id under that id; the workers get the folder.
        config = config.replace(model=str(folder), served_model_name=config.served_model_name or config.model)
    model = check_model_folder(folder)
    try:
        tokenizer = Tokenizer.from_folder(folder)
    except TokenizerError as error:  # the frontend's tokenizer is part of the model folder
        raise ModelFolderError(str(error)) from None
    check_tokenizer_vocabulary(tokenizer.max_token_id, model, folder)
    device = resolve_device(config.device)
    if device == "cuda":
        check_cuda_ranks(config, device, num_cuda_devices())
    return dataclasses.replace(config, plan=plan_engine(config, model, device))
