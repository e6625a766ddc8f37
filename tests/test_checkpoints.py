"""Checkpoints saved already 4-bit, as published copies of polyglot-ko are: any bitsandbytes 4-bit kind loads, computes
in the engine's compute dtype whatever the checkpoint stores, and reports what its layers really are; checkpoints
the engine cannot serve exactly are refused before any weight is read."""
from __future__ import annotations

import pytest
import torch

from conftest import run
from service.engine.engine import ScoreOptions

PAIRS = [("오늘은 날씨가", " 맑고 바람이 시원하다."), ("", "서울의 봄은"), ("우리 가족은 주말마다 공원에서", " 산책을 한다.")]


def _quantized(tiny_dir, out, quant_type: str, stored_compute: torch.dtype, double_quant: bool):
    """The tiny model quantized by transformers' BitsAndBytesConfig with a stored compute dtype, saved before any
    forward pass (bitsandbytes repacks CPU weights at the first one), and its state dict at that moment."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=BitsAndBytesConfig(
                                                     load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                                     bnb_4bit_compute_dtype=stored_compute,
                                                     bnb_4bit_use_double_quant=double_quant))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(out)
    return state


@pytest.mark.parametrize("quant_type, stored, double_quant", [("fp4", torch.float32, False),
                                                              ("fp4", torch.bfloat16, True),
                                                              ("nf4", torch.float16, True)])
def test_saved_4bit_checkpoint_computes_in_the_engine_dtype(tiny_dir, tmp_path, quant_type, stored, double_quant):
    """The published copy stores fp4 and float32 compute (bitsandbytes' defaults): the engine computes in its own
    dtype (float32 on the CPU, float16 on a GPU) in every layer, reports the layers' real quantization, holds the
    saved bytes exactly, and scores what transformers' forward of those very modules gives."""
    from service.engine.config import EngineConfig, ModelConfig
    from service.engine.engine import Engine
    from service.engine.text import encode_pair

    state = _quantized(tiny_dir, tmp_path, quant_type, stored, double_quant)
    engine = Engine(EngineConfig(model=ModelConfig(model=str(tmp_path), device="cpu", quantization="none")))
    lm = engine.lm
    assert (lm.quantization, lm.double_quant, lm.quant_storage) == (quant_type, double_quant, "uint8")
    assert lm.checkpoint_compute_dtype == str(stored).removeprefix("torch.") and lm.compute_dtype == torch.float32
    layers = [m for m in lm.model.modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == 4 * 2 and all(m.compute_dtype == torch.float32 for m in layers)
    assert {m.weight.quant_state.quant_type for m in layers} == {quant_type}
    again = lm.model.state_dict()  # before any forward: the saved bytes, exactly
    assert sorted(again) == sorted(state)
    for k, v in state.items():
        assert again[k].dtype == v.dtype and torch.equal(again[k], v), k

    res = run(engine.score(PAIRS, ScoreOptions()))
    for (c, x), r in zip(PAIRS, res):
        p = encode_pair(lm.tokenizer, c, x, lm.eos_token_id)
        ids = torch.tensor([p.context_ids + p.continuation_ids])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(ids[:, :-1]).logits.float(), -1)[0]
        n = len(p.continuation_ids)
        ref = float(logp[-n:].gather(-1, torch.tensor(p.continuation_ids)[:, None]).sum())
        assert r.logprob == pytest.approx(ref, abs=1e-3)
    engine.close()


def _config(**kw):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, **kw)


@pytest.mark.parametrize("make, message", [
    (lambda: _config(rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling"),
    (lambda: __import__("transformers").GPT2Config(), "GPT-NeoX"),
    (lambda: _config(quantization_config={"load_in_8bit": True, "quant_method": "bitsandbytes"}), "int8"),
])
def test_unservable_checkpoints_are_refused_before_loading(make, message):
    from service.engine.loader import check_servable

    with pytest.raises(ValueError, match=message):
        check_servable(make())
    check_servable(_config())  # polyglot-ko's own kind passes
    check_servable(_config(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}))
