"""Chat formatting and tokenisation shared by generation, training and evaluation (defined once so
they agree).

Gemma3 has no system role: a system turn (the LEK-1 kernel when the root teacher is built) is folded
into the first user turn, as Gemma's own template does. Responses end with <end_of_turn>.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Gemma3's turn format, text only. Used by the tiny tokenizer; real models bring their own template.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

END_OF_TURN = "<end_of_turn>"
IGNORE_INDEX = -100

Messages = list[dict[str, str]]


def prompt_messages(prompt: Messages, system: str | None = None) -> Messages:
    """The conversation a model answers: an optional system turn, then the prompt's turns."""
    return ([{"role": "system", "content": system}] if system else []) + list(prompt)


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """Chat-template text up to and including the model's turn opener."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer: Any, messages: Messages, system: str | None = None) -> list[int]:
    """The token ids of a conversation up to the model's turn opener (an optional system turn
    first)."""
    return tokenizer(
        render_prompt(tokenizer, prompt_messages(messages, system)), add_special_tokens=False
    )["input_ids"]


def padded_ids(model: Any, tok: Any) -> list[int] | None:
    """The ids of the model's output rows past its tokenizer (Gemma 3 4B/12B/27B carry 64 such
    padding rows over 1B's vocabulary): never a token, so never sampled (generate's
    suppress_tokens); None when there are none."""
    rows = model.get_output_embeddings().weight.shape[0]
    return list(range(len(tok), rows)) or None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Tokens that end a response: eos and, when the vocabulary has it, <end_of_turn>."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(i for i in ids if i is not None)


def vocab_hash(tokenizer: Any) -> str:
    """Identity of a tokenizer's vocabulary (token -> id): stored top-k token ids mean the same to
    another model only when this matches."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[
        :16
    ]


def template_hash(tokenizer: Any) -> str:
    """Identity of the chat template (part of a generation's cache key)."""
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def encode_example(tokenizer: Any, messages: Messages, response: str,
                   max_len: int) -> dict[str, list[int]]:
    """input_ids and labels for one prompt -> response pair; labels mask every prompt token
    (IGNORE_INDEX)."""
    prompt = prompt_ids(tokenizer, messages)
    response_ids = tokenizer(response.strip() + END_OF_TURN, add_special_tokens=False)["input_ids"]
    input_ids = (prompt + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt) + response_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(rows: list[dict[str, list[int]]], pad_id: int,
            device: Any = "cpu") -> tuple[Any, Any, Any]:
    """Right-pad encoded examples into (input_ids, labels, attention_mask) tensors."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)
