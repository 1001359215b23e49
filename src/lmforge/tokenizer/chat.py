"""The Llama 2 chat format on token ids, with the SFT loss mask (Meta's reference encoding).

A dialogue is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an optional
system message first, then user and assistant messages alternating, starting with the user. The system
message is merged into the first user message, and each exchange is encoded on its own, as in Meta's
`chat_completion` (llama/generation.py):

    completed exchange:  [bos] + encode(f"[INST] {user.strip()} [/INST] {answer.strip()} ") + [eos]
    open exchange:       [bos] + encode(f"[INST] {user.strip()} [/INST]")     (the generation prompt)
    system merged:       user = "<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + user

`<s>` and `</s>` are ids, never text: a user who types "<s>" gets the characters, not id 1.

Worked example of the loss mask (pieces of a 600-piece test vocabulary; 1 = learned):

    ids    <s>  ▁[  INST ]  ▁hi ▁[  /  INST ]  ▁yes ▁  </s>
    mask    0   0   0    0   0   0  0   0   0   1   1    1

The mask starts at the first token of the exchange that differs from the tokens of its prompt
`"[INST] {user} [/INST]"` encoded alone: with Llama's settings (split_by_whitespace) no piece crosses the
space after "[/INST]", so that is exactly the answer's first token, and the answer's leading space is part
of it. It covers the trailing " " piece and the closing `</s>`: the model learns to stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
ROLES = ("system", "user", "assistant")

# NOTE: the same format as a Jinja template, for Hugging Face's `apply_chat_template` (hf_export.py writes
# it into tokenizer_config.json; tests check both give the same ids). In Llama 2 the generation prompt *is*
# the end of the user turn ("[/INST]"), so `add_generation_prompt` adds nothing: a dialogue ending with a user
# message is always rendered open, as in Meta's code and Hugging Face's Llama 2 template, and
# add_generation_prompt=True only demands that the last message be the user's.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if not loop_messages -%}"
    "{{- raise_exception('A Llama 2 dialogue needs at least one user message') -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] or (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Roles must be an optional system message, then user and assistant alternating, "
    "starting with the user') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
    "{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + message['content'].strip() + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and loop_messages[-1]['role'] != 'user' -%}"
    "{{- raise_exception('add_generation_prompt needs a dialogue that ends with a user message') -}}"
    "{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A dialogue that the Llama 2 chat format cannot encode."""


class _Encoder(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


@dataclass
class ChatEncoding:
    """`ids` of a dialogue and `loss_mask`, True on the tokens the SFT loss learns; both of length L."""

    ids: list[int]
    loss_mask: list[bool]


def exchanges(messages: Sequence[dict], add_generation_prompt: bool = False) -> list[tuple[str, str | None]]:
    """(user text, answer or None) pairs of a validated dialogue, the system message merged into the first
    user text; only the last pair can be open (answer None)."""
    if isinstance(messages, (str, dict)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i} ({m['role']}) content must be a str, got {type(m['content']).__name__}")
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    if not turns:
        raise ChatFormatError("the dialogue has a system message but no user message")
    offset = len(messages) - len(turns)
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChatFormatError(f"message {i + offset} is {m['role']!r}, expected {expected!r}: a dialogue is an "
                                  "optional system message, then user and assistant alternating, user first")
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise ChatFormatError("add_generation_prompt=True needs a dialogue that ends with a user message")
    users = [m["content"] for m in turns[0::2]]
    answers: list[str | None] = [m["content"] for m in turns[1::2]]
    if system is not None:
        users[0] = B_SYS + system + E_SYS + users[0]
    answers += [None] * (len(users) - len(answers))
    return list(zip(users, answers))


def encode_chat(
    tokenizer: _Encoder,
    messages: Sequence[dict],
    add_generation_prompt: bool = False,
    learn: Literal["all", "last"] = "all",
) -> ChatEncoding:
    """Token ids and loss mask of a Llama 2 dialogue (see the module docstring).

    `learn="all"` marks the answers of every completed exchange, `"last"` only the last completed one (Ghost
    Attention and rejection-sampling data train on the final answer alone). An open final user message is
    never learned: it is the prompt for the next answer.
    """
    if learn not in ("all", "last"):
        raise ValueError(f"learn must be 'all' or 'last', got {learn!r}")
    pairs = exchanges(messages, add_generation_prompt)
    completed = sum(answer is not None for _, answer in pairs)
    ids: list[int] = []
    mask: list[bool] = []
    for k, (user, answer) in enumerate(pairs):
        prompt = tokenizer.encode(f"{B_INST} {user.strip()} {E_INST}")
        if answer is None:
            ids += [tokenizer.bos_id, *prompt]
            mask += [False] * (1 + len(prompt))
            continue
        learned = learn == "all" or k == completed - 1
        full = tokenizer.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ")
        n = _common_prefix(full, prompt)  # tokens [0, n) belong to the prompt; [n, len(full)) to the answer
        ids += [tokenizer.bos_id, *full, tokenizer.eos_id]
        mask += [False] * (1 + n) + [learned] * (len(full) - n + 1)
    return ChatEncoding(ids, mask)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n
