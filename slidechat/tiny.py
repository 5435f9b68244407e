"""A tiny random Qwen2 causal LM with a BPE tokenizer trained on the fly (demo DAG and tests).

Nothing is downloaded: the tokenizer is trained on the given texts with the Qwen2 pre-tokenizer
(NFC, Qwen's split regex, byte-level BPE) and the Qwen chat special tokens; the model is a
`Qwen2ForCausalLM` with random weights from a fixed seed. The directory loads offline with
`AutoTokenizer.from_pretrained(dir)` / `AutoModelForCausalLM.from_pretrained(dir)`.

Chat template: the Qwen2 format `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message and
`<|im_start|>assistant\\n` as generation prompt, with *no* default system prompt (Qwen2.5's own
template injects "You are Qwen, ..." when no system message is given; SlideChat was trained
without a system prompt, and `slidechat.template` builds prompts itself, so the tiny model keeps
the template minimal).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wsicore.cli import command_parser
from wsicore.errors import InputError, UsageError
from wsicore.files import atomic_path, input_file

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2 chat format without a default system prompt.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The pre-tokenisation regex of the Qwen2 tokenizer.
_QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # sorted, de-duplicated input: the result must not depend on the corpus order
    tok.train_from_iterator(sorted(set(t for t in texts if t)), trainer=trainer)
    return tok


def build_tiny_llm(
    out_dir: str | Path,
    texts: list[str],
    vocab_size: int = 1024,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random `Qwen2ForCausalLM` and a BPE tokenizer trained on `texts` to `out_dir`.

    Deterministic for the same arguments. Returns `out_dir`.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    if not texts:
        raise ValueError("build_tiny_llm needs a non-empty text corpus for the tokenizer")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    out_dir = Path(out_dir)
    bpe = _train_bpe(list(texts), vocab_size)
    state = json.loads(bpe.to_str())
    vocab = state["model"]["vocab"]
    merges = state["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 131072

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=65536,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    with atomic_path(out_dir, is_dir=True, replaces="config.json") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def main(argv: list[str]) -> int:
    """`slidechat make-tiny-llm --out DIR --corpus FILE [FILE ...]`."""
    p = command_parser("slidechat make-tiny-llm", __doc__.splitlines()[0],
                       "slidechat make-tiny-llm --out demo/tiny_llm --corpus demo/instructions/corpus.txt")
    p.add_argument("--out", required=True, help="output directory (HF model + tokenizer)")
    p.add_argument("--corpus", nargs="+", required=True, help="text files for the tokenizer (one text per line)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size (special tokens included)")
    p.add_argument("--hidden-size", type=int, default=64, help="width of the Qwen2 layers")
    p.add_argument("--num-layers", type=int, default=2, help="transformer layers")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads (must divide --hidden-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = p.parse_args(argv)
    if a.hidden_size % a.num_heads:
        raise UsageError(f"--num-heads {a.num_heads} does not divide --hidden-size {a.hidden_size}")
    texts: list[str] = []
    for f in a.corpus:
        path = input_file(f, "corpus text file", "--corpus")
        texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not texts:
        raise InputError(f"the --corpus file(s) {', '.join(a.corpus)} hold no text to train the tokenizer on")
    out = build_tiny_llm(a.out, texts, a.vocab_size, a.hidden_size, a.num_layers, a.num_heads, a.seed)
    print(out)
    return 0
