"""Building, saving and loading ST-LLM models; device and dtype choice.

A model directory holds:
    stllm.json               backbone spec (the base reference), method config, version, the windows
                             and per-label thresholds its round chose
    trainable.safetensors    the non-LoRA trainable parts (projector/connector, global-local MLP, MVM head)
    adapter/                 the LoRA adapter in peft's format (absent for a base model)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from workers.stllm.backbones import build_backbone, resolve_spec
from workers.stllm.model import STLLM, STLLMConfig

log = logging.getLogger(__name__)
MODEL_FILE = "stllm.json"


def cpu_has_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 runs ~4x fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(device: str | None = None, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA in bf16 where a GPU is visible, else CPU in fp32. ``device``/``dtype`` ('cpu', 'cuda:1';
    'fp32', 'bf16', 'auto') override; 'auto' on CPU means bf16 where the CPU has bf16 units."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype in (None, "auto"):
        if dev.type == "cuda" or (dtype == "auto" and cpu_has_bf16()):
            return dev, torch.bfloat16
        return dev, torch.float32
    if dtype not in names:
        raise ValueError(f"dtype must be one of fp32, bf16, auto; got {dtype!r}")
    return dev, names[dtype]


def _quiet_transformers() -> None:
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def build_model(
    model: str | dict[str, Any],
    config: STLLMConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> STLLM:
    """A fresh ST-LLM over a backbone: 'builtin', a SmolVLM2 hub id or path, or a spec dict.
    The trainable parts start from a fixed-seed initialisation, so a fresh model is the same everywhere;
    its version is '<name>@base'."""
    _quiet_transformers()
    spec = resolve_spec(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(
            0
        )  # the fresh trainable parts (e.g. builtin's projector) are the same in every process
        stllm = STLLM(build_backbone(spec, Path(cache_dir) if cache_dir else None), config)
    stllm.version = f"{model}@base" if isinstance(model, str) else f"{spec['kind']}@base"
    dev, dt = choose_device(device, dtype)
    stllm.to(dev)
    stllm.compute_dtype = dt
    return stllm


def save_model(model: STLLM, directory: str | os.PathLike, version: str | None = None) -> Path:
    """Write ``model`` to ``directory`` (created; written under a temporary name and renamed into place)."""
    if getattr(model, "merged_adapter", None):
        raise ValueError(
            f"this model was loaded for serving, its adapter ({model.merged_adapter}) merged into the decoder; "
            "load it with trainable=True to save it"
        )
    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=False)
    meta = {
        "backbone": model.backbone.spec,
        "config": dataclasses.asdict(model.config),
        "version": version or model.version,
        "prelabel_defaults": model.prelabel_defaults,
    }
    (tmp / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    state = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, module in model.trainable_modules().items()
        for k, v in module.state_dict().items()
    }
    save_file(state, tmp / "trainable.safetensors")
    if hasattr(model.lm, "peft_config"):
        model.lm.save_pretrained(tmp / "adapter")
    if directory.exists():
        raise FileExistsError(f"model directory {directory} already exists")
    tmp.rename(directory)
    return directory


def set_prelabel_defaults(directory: str | os.PathLike, defaults: dict) -> None:
    """Record in a saved model directory what pre-labeling with it uses by default (windows, per-label
    thresholds), written atomically."""
    path = Path(directory) / MODEL_FILE
    meta = json.loads(path.read_text())
    meta["prelabel_defaults"] = defaults
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(path)


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MODEL_FILE).is_file()


def load_model(
    directory_or_name: str | os.PathLike,
    device: str | None = None,
    dtype: str | None = None,
    trainable: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> STLLM:
    """Load a saved model directory, or build a fresh one from a name ('builtin', a SmolVLM2 hub id or path).
    ``trainable`` loads a LoRA adapter ready to train on (a round continuing from its parent)."""
    if not is_model_dir(directory_or_name):
        return build_model(str(directory_or_name), device=device, dtype=dtype, cache_dir=cache_dir)
    directory = Path(directory_or_name)
    meta = json.loads((directory / MODEL_FILE).read_text())
    spec = meta["backbone"]
    if spec.get("model") and not Path(spec["model"]).is_absolute() and (directory / spec["model"]).exists():
        spec = {**spec, "model": str(directory / spec["model"])}  # weights kept inside the model directory
    model = build_model(spec, STLLMConfig(**meta["config"]), device=device, dtype=dtype, cache_dir=cache_dir)
    state = load_file(directory / "trainable.safetensors")
    for name, module in model.trainable_modules().items():
        prefix = name + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    if (directory / "adapter").is_dir():
        model.load_lora(str(directory / "adapter"), trainable=trainable)
    model.to(model.device)
    model.version = meta.get("version", "base")
    model.prelabel_defaults = meta.get("prelabel_defaults") or {}
    model.eval()
    return model
