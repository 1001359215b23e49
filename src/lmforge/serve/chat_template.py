"""The prompt ids of a chat request: OpenAI-style messages -> the model's chat format -> token ids.

Two formats:

    ours      Llama 2's format, encoded on ids by `lmforge.tokenizer.encode_chat` (the default)
    folder's  a Hugging Face folder's own Jinja `chat_template` (tokenizer_config.json, or chat_template.jinja),
              rendered the way transformers' `apply_chat_template` renders it (a sandboxed Jinja environment
              with trim_blocks, lstrip_blocks, loop controls, `raise_exception` and `strftime_now`), then encoded

Encoding a rendered template: the text is split at the special-token strings the folder declares ("<s>",
"</s>", ...), each of which becomes its id, and every piece between them is encoded by SentencePiece on its
own (with its own dummy prefix), which is what a Llama tokenizer with `legacy: true` does. Worked example,
"<s>[INST] hi [/INST]" -> [bos] + encode("[INST] hi [/INST]"), the ids `encode_chat` gives.
NOTE: as in transformers, a special-token string typed by a user ("<s>") is then that token: rendered text
cannot tell the template's "<s>" from the user's. Our own format works on ids and never does this.

Messages first go through `normalize_messages`: text content parts are joined with "\\n", any other part is
refused naming it (`messages[i].content[j]`), and "developer" becomes "system".
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Any, Sequence

from lmforge.tokenizer.chat import ChatFormatError, encode_chat


class MessageError(ValueError):
    """A message the server cannot use; `param` names the request field (e.g. "messages[1].content[0]")."""

    def __init__(self, message: str, param: str | None = "messages"):
        super().__init__(message)
        self.param = param


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    """[{"role", "content": str}] from request messages (pydantic models or dicts with role / content)."""
    out = []
    for i, m in enumerate(messages):
        role, content = (m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content)
        if role == "developer":
            role = "system"
        if content is None:
            raise MessageError(f"messages[{i}].content is null: every message needs text", f"messages[{i}].content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise MessageError(f"messages[{i}].content[{j}] is a {kind!r} part; this server accepts text "
                                       "parts only ({'type': 'text', 'text': ...})", f"messages[{i}].content[{j}]")
                texts.append(part["text"])
            content = "\n".join(texts)
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """`encode(messages) -> prompt ids` ending where the assistant's answer starts."""

    def __init__(self, tokenizer, template: str | None = None, special_tokens: dict[str, str] | None = None):
        """template: a Jinja chat template, or None for ours (Llama 2 via encode_chat). special_tokens: names
        ("bos_token", ...) to their strings, passed to the template and split out when encoding."""
        self.tokenizer, self.source = tokenizer, template
        self.special = dict(special_tokens or {})
        self._jinja = None
        if template is not None:
            self._jinja = _compile(template)
            strings = sorted({s for s in self.special.values() if s}, key=len, reverse=True)
            self._ids = {s: tokenizer.piece_to_id(s) for s in strings}
            unknown = [s for s, i in self._ids.items() if tokenizer.id_to_piece(i) != s]
            if unknown:
                raise ChatFormatError(f"the chat template's special token {unknown[0]!r} is not a piece of the tokenizer")
            self._split = re.compile("(" + "|".join(re.escape(s) for s in strings) + ")") if strings else None

    @classmethod
    def from_folder(cls, folder: str | Path | None, tokenizer) -> ChatTemplate:
        """The folder's own template when it has one (tokenizer_config.json's "chat_template", a string or
        a list of {"name", "template"} whose "default" is used, or chat_template.jinja); ours otherwise."""
        if folder is None:
            return cls(tokenizer)
        folder = Path(folder)
        config: dict = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{folder / 'tokenizer_config.json'} is not valid JSON: {e}") from None
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None:
            return cls(tokenizer)
        special = {name: _token_string(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(tokenizer, template, {k: v for k, v in special.items() if v})

    def encode(self, messages: Sequence[Any]) -> list[int]:
        dialogue = normalize_messages(messages)
        if self._jinja is None:
            try:
                return encode_chat(self.tokenizer, dialogue, add_generation_prompt=True).ids
            except ChatFormatError as e:
                raise MessageError(str(e)) from None
        return self.encode_text(self.render(dialogue))

    def render(self, dialogue: list[dict[str, str]]) -> str:
        import jinja2

        try:
            return self._jinja.render(messages=dialogue, add_generation_prompt=True, **self.special)
        except jinja2.TemplateError as e:
            raise MessageError(f"the model's chat template refused the messages: {e}") from None

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered text: special-token strings -> their ids, the pieces between encoded one by one."""
        ids: list[int] = []
        for piece in self._split.split(text) if self._split is not None else [text]:
            if piece in self._ids:
                ids.append(self._ids[piece])
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids


def _token_string(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or as {"content": str, ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile(template: str):
    """A Jinja environment like transformers' (NOTE: sandboxed: a template is data from the model's folder)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson  # transformers' version: non-ASCII text stays as it is
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatFormatError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


__all__ = ["ChatTemplate", "MessageError", "normalize_messages"]
