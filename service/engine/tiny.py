"""Builds the embedded default model: a tiny GPT-NeoX and a byte-level BPE tokenizer trained on shipped Korean text.

It exists so that the whole service (Ray Serve, gRPC, 4-bit loading, scoring, generation) runs and is
tested on any CPU machine with no model hub: same architecture family as polyglot-ko (rotary_pct 0.25,
parallel residual, untied embeddings, 2,048 positions), a few hundred thousand parameters, briefly
trained on the corpus so that it emits Hangul, and otherwise gibberish.

    python -m service.engine.tiny --out .models/tiny
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

CORPUS = Path(__file__).with_name("data") / "ko_corpus.txt"
EOT = "<|endoftext|>"
PAD = "<|padding|>"
SEED = 1234


def corpus_lines() -> list[str]:
    return [s for s in CORPUS.read_text(encoding="utf-8").splitlines() if s.strip()]


def train_tokenizer(lines: list[str], vocab_size: int = 1024):
    """Byte-level BPE (the polyglot-ko tokenizer's kind): every byte is a token, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD, model_max_length=2048
    )


def tiny_config(vocab_size: int, eos_id: int, pad_id: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        max_position_embeddings=2048,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def build(out: Path, steps: int = 150) -> Path:
    """Write config, weights and tokenizer to `out`; deterministic for a given torch build."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    lines = corpus_lines()
    tokenizer = train_tokenizer(lines)
    model = GPTNeoXForCausalLM(tiny_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))

    # A short training run so that generations look like Korean and logits are far from uniform
    # (a uniform model would make is_greedy and sampling tests vacuous).
    docs = [tokenizer(line + EOT)["input_ids"] for line in lines]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(docs, 16)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [B, T]
        labels = torch.full_like(ids, -100)
        for i, d in enumerate(batch):
            ids[i, : len(d)] = torch.tensor(d)
            labels[i, : len(d)] = torch.tensor(d)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "BUILD.json").write_text(json.dumps({"seed": SEED, "steps": steps, "final_loss": float(loss.detach())}))
    return out


def ensure(out: Path) -> Path:
    """Build the tiny model unless a complete one is already at `out`."""
    if not (out / "BUILD.json").exists():
        build(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".models/tiny"))
    ap.add_argument("--force", action="store_true", help="rebuild even if present")
    args = ap.parse_args()
    if args.force:
        build(args.out)
    else:
        ensure(args.out)
    print(f"tiny model at {args.out}: {json.loads((args.out / 'BUILD.json').read_text())}")


if __name__ == "__main__":
    main()
