"""Prompt format and tokenisation of conversations, exactly as SlideChat trained them.

SlideChat (xtuner `llava_map_fn` + the `qwen_chat` template + `encode_fn`) turns a conversation
into, per turn,

    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

with no system prompt and no BOS token. The `<image>` placeholder is moved to the front of the
human message that contains it (`"<image>\\n" + text.strip()`) and becomes the id
`IMAGE_TOKEN_INDEX` (-200), later replaced by the slide's visual tokens. The loss covers the answer
tokens and their `<|im_end|>`; the prompt and the `\\n` separator after `<|im_end|>` are ignored
(-100). Pieces are tokenised separately (text before/after `<image>`, the answer + `<|im_end|>`,
the separator), as the original did, so token ids match its training data.
"""

from __future__ import annotations

from typing import Any, Sequence

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
USER_PREFIX = IM_START + "user\n"
ASSISTANT_PREFIX = IM_START + "assistant\n"
SEPARATOR = "\n"
STOP_WORDS = (IM_END, "<|endoftext|>")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def check_chat_tokens(tokenizer: Any) -> None:
    """Fail clearly when the tokenizer lacks the Qwen chat tokens this format relies on."""
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in (IM_START, IM_END):
        ids = _encode(tokenizer, tok)
        if len(ids) != 1 or (unk is not None and ids[0] == unk):
            raise ValueError(
                f"the tokenizer has no single special token {tok!r}; SlideChat's Qwen chat format "
                "needs an LLM whose tokenizer defines <|im_start|>/<|im_end|> (e.g. Qwen2/Qwen2.5)"
            )


def _encode_user(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one user turn `<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n`."""
    full = USER_PREFIX + text + IM_END + "\n" + ASSISTANT_PREFIX
    if IMAGE_TOKEN not in full:
        return _encode(tokenizer, full)
    chunks = full.split(IMAGE_TOKEN)
    if len(chunks) != 2:
        raise ValueError(f"a conversation may hold at most one {IMAGE_TOKEN} placeholder")
    return _encode(tokenizer, chunks[0]) + [IMAGE_TOKEN_INDEX] + _encode(tokenizer, chunks[1])


def _to_turns(conversations: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """(input, output) pairs as xtuner's `llava_map_fn`: leading gpt turns dropped, human turns merged."""
    messages = list(conversations)
    while messages and messages[0].get("from") == "gpt":
        messages = messages[1:]
    turns: list[tuple[str, str]] = []
    pending = ""
    n_images = 0
    for msg in messages:
        role, value = msg.get("from"), msg.get("value", "")
        if value is None:
            value = ""
        if role == "human":
            if IMAGE_TOKEN in value:
                n_images += value.count(IMAGE_TOKEN)
                value = (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()
            pending += value
        elif role == "gpt":
            turns.append((pending, value))
            pending = ""
        else:
            raise ValueError(f"unknown conversation role {role!r} (expected 'human' or 'gpt')")
    if n_images > 1:
        raise ValueError(f"a conversation may hold at most one {IMAGE_TOKEN} placeholder, found {n_images}")
    return turns


def tokenize_conversation(
    tokenizer: Any,
    conversations: Sequence[dict[str, str]],
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Token ids and labels of a SlideInstruction conversation (`[{"from": "human"|"gpt", "value": ...}]`).

    `<image>` in a human turn becomes `IMAGE_TOKEN_INDEX`; labels are `IGNORE_INDEX` except the
    assistant replies and their `<|im_end|>`. With `max_length`, both lists are truncated to it
    (as the original); truncating away the image placeholder is an error.
    """
    check_chat_tokens(tokenizer)
    turns = _to_turns(conversations)
    if not turns:
        raise ValueError("conversation has no assistant ('gpt') reply")
    input_ids: list[int] = []
    labels: list[int] = []
    sep = _encode(tokenizer, SEPARATOR)
    for question, answer in turns:
        prompt = _encode_user(tokenizer, question)
        reply = _encode(tokenizer, answer + IM_END)
        input_ids += prompt + reply + sep
        labels += [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(sep)
    if max_length is not None and len(input_ids) > max_length:
        if IMAGE_TOKEN_INDEX in input_ids and input_ids.index(IMAGE_TOKEN_INDEX) >= max_length:
            raise ValueError(f"max_length {max_length} would cut the {IMAGE_TOKEN} placeholder")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def build_generation_prompt(
    tokenizer: Any,
    question: str,
    history: Sequence[tuple[str, str]] | None = None,
    with_image: bool = True,
) -> list[int]:
    """Prompt ids for the next answer: previous (question, answer) turns, then `question`.

    The first user turn carries `<image>` (as `IMAGE_TOKEN_INDEX`) when `with_image`; the ids end
    with `<|im_start|>assistant\\n`.
    """
    check_chat_tokens(tokenizer)
    questions = [q for q, _ in (history or [])] + [question]
    answers = [a for _, a in (history or [])]
    ids: list[int] = []
    sep = _encode(tokenizer, SEPARATOR)
    for i, q in enumerate(questions):
        q = q.replace(IMAGE_TOKEN, "").strip()
        if i == 0 and with_image:
            q = IMAGE_TOKEN + "\n" + q
        ids += _encode_user(tokenizer, q)
        if i < len(answers):
            ids += _encode(tokenizer, answers[i] + IM_END) + sep
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end generation: `<|im_end|>` and `<|endoftext|>` where the tokenizer has them."""
    out: list[int] = []
    for word in STOP_WORDS:
        ids = _encode(tokenizer, word)
        if len(ids) == 1 and ids[0] not in out:
            out.append(ids[0])
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int) and eos not in out:
        out.append(eos)
    return out
