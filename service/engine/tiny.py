"""Builds the embedded default model: a tiny GPT-NeoX and a byte-level BPE tokenizer trained on shipped Korean text.

It exists so that the whole service (Ray Serve, gRPC, 4-bit loading, scoring, generation) runs and is
tested on any CPU machine with no model hub: same architecture family as polyglot-ko (rotary_pct 0.25,
parallel residual, untied embeddings, 2,048 positions), a few hundred thousand parameters, briefly
trained on the corpus so that it emits Hangul, and otherwise gibberish.

    python -m service.engine.tiny --out .models/tiny
    python -m service.engine.tiny --out DIR --real-like   # the fixture with the real tokenizer's and config's properties

The real-like fixture (build(..., real_like=True), used by the tests) has the properties of polyglot-ko's own
tokenizer and config that the default one lacks (../shared/REAL_MODEL.md): fewer tokenizer entries than embedding rows
(padding rows), bos 0 in the config unlike eos 2, no pad token in the config, no bos or unk token in the tokenizer,
eos = pad = <|endoftext|>, and the special tokens split out of input text, the personal-data masks
<|acc|> <|tel|> <|rrn|> last; it is trained on lines that contain those masks, so it generates them.
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
# polyglot-ko's special tokens: ids 0-3 first, the personal-data masks after the BPE vocabulary (30000-30002 there).
REAL_FIRST = ["<|unused0|>", "<|unused1|>", EOT, "<|sep|>"]
REAL_MASKS = ["<|acc|>", "<|tel|>", "<|rrn|>"]
MASK_LINES = ["제 전화번호는 <|tel|> 입니다.", "계좌번호 <|acc|> 로 입금해 주세요.", "주민등록번호는 <|rrn|> 입니다.",
              "문의는 <|tel|> 로 연락 바랍니다."]


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


def train_real_like_tokenizer(lines: list[str], vocab_size: int = 1024):
    """Byte-level BPE with polyglot-ko's special-token layout and settings: no normalizer, no bos/unk token, eos = pad,
    nothing added when encoding, special tokens split out of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=REAL_FIRST,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens(REAL_MASKS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, pad_token=EOT, model_max_length=int(1e30))


def tiny_config(vocab_size: int, eos_id: int, pad_id: int | None, bos_id: int | None = None):
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
        bos_token_id=eos_id if bos_id is None else bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def build(out: Path, steps: int = 150, real_like: bool = False) -> Path:
    """Write config, weights and tokenizer to `out`; deterministic for a given torch build."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    lines = corpus_lines()
    if real_like:
        lines += MASK_LINES * 8
        tokenizer = train_real_like_tokenizer(lines)
        # Embedding rows beyond the tokenizer, as polyglot-ko has 30,080 rows for 30,003 entries.
        rows = len(tokenizer) + 77
        config = tiny_config(rows, tokenizer.eos_token_id, None, bos_id=0)
        config.pad_token_id = None
    else:
        tokenizer = train_tokenizer(lines)
        config = tiny_config(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = GPTNeoXForCausalLM(config)

    # A short training run so that generations look like Korean and logits are far from uniform
    # (a uniform model would make is_greedy and sampling tests vacuous).
    docs = [tokenizer(line + EOT)["input_ids"] for line in lines]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(docs, 16)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)  # [B, T] (masked out of the loss)
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
    ap.add_argument("--real-like", action="store_true", help="the fixture with the real tokenizer's properties")
    args = ap.parse_args()
    if args.force or args.real_like:
        build(args.out, real_like=args.real_like)
    else:
        ensure(args.out)
    print(f"tiny model at {args.out}: {json.loads((args.out / 'BUILD.json').read_text())}")


if __name__ == "__main__":
    main()
