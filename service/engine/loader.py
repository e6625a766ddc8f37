"""Loads a causal LM and its tokenizer with transformers, 4-bit quantized by bitsandbytes by default."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from .config import ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference plus what ModelInfo reports about it."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    compute_dtype: torch.dtype
    quantization: str
    max_context: int
    vocab_size: int
    """Rows of the output layer (30,080 for polyglot-ko)."""
    eos_token_id: int
    model_id: str
    revision: str
    tokenizer_hash: str
    quant_storage: str = "none"
    """Storage dtype of the packed 4-bit weights (bitsandbytes' quant_storage), read off the loaded modules."""
    double_quant: bool = False
    """Whether the 4-bit layers' quantization constants are themselves quantized (read off the modules)."""
    tokenizer_size: int = 0
    """Entries of the tokenizer (30,003 for polyglot-ko): ids from here to vocab_size are padding rows of the
    output layer, never generated and refused as input."""
    prefix_token_id: int = 0
    """What an empty Score context is conditioned on: lm-eval's HFLM prefix, the tokenizer's bos token if it has
    one, else its eos (polyglot-ko's tokenizer has no bos token, although its config names bos id 0)."""
    checkpoint_compute_dtype: str = "none"
    """The compute dtype stored in a saved 4-bit checkpoint's quantization config (the engine computes in
    compute_dtype whatever it says)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # fp16 on CPU is slow and lossy; fp32 keeps the CPU path exact against transformers.
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def check_servable(hf_config) -> None:
    """Refuse, before loading any weights, a model the engine cannot serve exactly: it runs its own GPT-NeoX forward
    (plain rotary embeddings) over bitsandbytes 4-bit or unquantized layers."""
    kind = getattr(hf_config, "model_type", None)
    if kind != "gpt_neox":
        raise ValueError(f"the engine serves GPT-NeoX models (polyglot-ko's architecture), not {kind!r}")
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope scaling {scaling} is not implemented by the engine's rotary embedding")
    if _prequantized(hf_config) not in (None, "nf4", "fp4"):
        raise ValueError(f"checkpoint is quantized as {_prequantized(hf_config)!r}: only bitsandbytes 4-bit "
                         "(nf4, fp4) or unquantized checkpoints are served")


def _four_bit_layers(model: torch.nn.Module) -> list:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _compute_in(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    """Make every 4-bit layer compute in `dtype` (a saved checkpoint's stored compute dtype would otherwise win:
    bitsandbytes' defaults store float32, 10x slower than float16 on a GPU and unlike the other layers' dtype), check
    that every other floating tensor is in `dtype` too, and return what the modules really hold."""
    layers = _four_bit_layers(model)
    for m in layers:
        m.compute_dtype = dtype
        m.compute_type_is_set = True
    quant = {q.weight.quant_state.quant_type for q in layers}
    others = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if others - {dtype}:
        raise ValueError(f"model tensors in {sorted(map(str, others))}, expected only {dtype}")
    if len(quant) > 1:
        raise ValueError(f"the model mixes 4-bit types {sorted(quant)}")
    return {
        "quantization": quant.pop() if quant else "none",
        "quant_storage": str(layers[0].weight.dtype).removeprefix("torch.") if layers else "none",
        "double_quant": any(q.weight.quant_state.nested for q in layers),
    }


def _prequantized(hf_config) -> str | None:
    """Quantization of a checkpoint saved already quantized by bitsandbytes, else None."""
    q = getattr(hf_config, "quantization_config", None)
    if q is None:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        return q.get("bnb_4bit_quant_type", "nf4")
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return "int8"
    return str(q.get("quant_method", "unknown"))


def _local_revision(path: Path) -> str:
    """A cheap content hash of a local checkpoint: config plus weight file names and sizes."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.suffix == ".json":
                h.update(f.read_bytes())
    return "local-" + h.hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load(cfg: ModelConfig) -> LoadedModel:
    """Load model and tokenizer as `cfg` says; every failure raises with the reason."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.compute_dtype, device)
    kw = dict(revision=cfg.revision) if cfg.revision else {}
    hf_config = AutoConfig.from_pretrained(cfg.model, **kw)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model, **kw)

    check_servable(hf_config)
    quant = _prequantized(hf_config)
    stored = getattr(hf_config, "quantization_config", None) or {}
    stored = stored if isinstance(stored, dict) else stored.to_dict()
    load_kw: dict = dict(dtype=dtype, device_map={"": device}, low_cpu_mem_usage=True, **kw)
    if quant is None and cfg.quantization != "none":
        if cfg.quantization not in ("nf4", "fp4"):
            raise ValueError(f"quantization must be nf4, fp4 or none, not {cfg.quantization!r}")
        load_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quantization,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=cfg.double_quant,
        )
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **load_kw)
    model.eval()
    model.requires_grad_(False)
    modules = _compute_in(model, dtype)
    rows = int(model.get_output_embeddings().weight.shape[0])

    n_pos = int(getattr(hf_config, "max_position_embeddings", 2048))
    max_context = min(cfg.max_context, n_pos) if cfg.max_context > 0 else n_pos
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer of {cfg.model} has no end-of-text token")
    local = Path(cfg.model)
    # A hub model reports the commit its files came from (what a branch or tag resolved to in the hub cache).
    revision = getattr(hf_config, "_commit_hash", None) or cfg.revision or "main"
    if local.is_dir():
        revision = _local_revision(local)
    log.info("loaded %s (%s, %s) on %s", cfg.model, modules["quantization"], dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(cfg.cudnn_attention)  # process-wide: one model per replica
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        compute_dtype=dtype,
        quantization=modules["quantization"],
        max_context=max_context,
        vocab_size=rows,
        eos_token_id=int(eos),
        model_id=str(cfg.model) if not local.is_dir() else os.path.abspath(cfg.model),
        revision=revision,
        tokenizer_hash=tokenizer_hash(tokenizer),
        quant_storage=modules["quant_storage"],
        double_quant=modules["double_quant"],
        checkpoint_compute_dtype=str(stored.get("bnb_4bit_compute_dtype", "none")).removeprefix("torch."),
        tokenizer_size=min(len(tokenizer), rows),
        prefix_token_id=int(eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id),
    )
