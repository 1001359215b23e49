"""Export a SentencePiece BPE tokenizer as a Hugging Face tokenizer folder that encodes exactly like it.

    export_hf_tokenizer("tokenizer/tokenizer.model", "hf_model/")
    AutoTokenizer.from_pretrained("hf_model/")  # same ids as Tokenizer("tokenizer/tokenizer.model")

writes `tokenizer.model` (the SentencePiece file, unchanged), `tokenizer.json` (the same model in the
`tokenizers` format, built here in plain Python: no transformers or tokenizers needed to export),
`tokenizer_config.json` (special tokens, add_bos_token true, add_eos_token false, the Llama 2 chat template
of chat.py) and `special_tokens_map.json`. Each file is written to a temporary name, then renamed.

How `tokenizer.json` reproduces SentencePiece (the "legacy" Llama layout of meta-llama/Llama-2-7b-hf):

    normalizer     Prepend("▁") then Replace(" ", "▁")   = add_dummy_prefix + escape_whitespaces
    pre_tokenizer  none (Split on user-defined pieces, if the model has any, as SentencePiece keeps them whole)
    model          BPE over the same vocabulary, byte_fallback, merges = every split (left, right) of a
                   normal piece into two normal pieces, ranked by the merged piece's score (SentencePiece
                   merges the adjacent pair whose union scores highest; in a BPE model the score is -id)
    decoder        Replace("▁", " "), ByteFallback, Fuse, Strip one leading space
    post_processor <s> $A   (add_bos_token true, add_eos_token false)

NOTE: `tokenizer_class` defaults to "PreTrainedTokenizerFast", not "LlamaTokenizerFast". transformers 5 builds
a LlamaTokenizer's pipeline in its own `__init__` and drops the normalizer of tokenizer.json for a Metaspace
pre-tokenizer, which skips the dummy prefix when the text already starts with a space: " hi" becomes
["▁hi"] where SentencePiece (and Meta's code) gives ["▁▁", "hi"] or ["▁", "▁hi"] (transformers'
`build_tokenizer_from_spm_proto` carries a comment on this very difference). The generic class loads
tokenizer.json verbatim, in transformers 4 and 5 alike, and matches SentencePiece on every text we test.
Pass tokenizer_class="LlamaTokenizerFast" for tools that insist on the Llama class; it then differs on texts
that begin with whitespace (tests pin this with a strict xfail, so a fix upstream is noticed).

NOTE: Hugging Face tokenizers parse special-token strings in text: "<s>" typed by a user becomes id 1, where
SentencePiece encodes the characters. Pass `split_special_tokens=True` to a Hugging Face tokenizer to get
SentencePiece's behaviour; the chat template needs the default (it writes `bos_token` as text).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmforge.io import atomic_file
from lmforge.tokenizer.chat import CHAT_TEMPLATE
from lmforge.tokenizer.tokenizer import TokenizerError

SPACE = "▁"  # U+2581, SentencePiece's meta-space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types


def export_hf_tokenizer(
    tokenizer_model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    tokenizer_class: str = "PreTrainedTokenizerFast",
    model_max_length: int | None = None,
) -> list[str]:
    """Write a Hugging Face tokenizer folder for a SentencePiece BPE model; returns the paths written."""
    src = Path(tokenizer_model_path)
    if src.is_dir():
        src = src / "tokenizer.model"
    proto = _load_proto(src)
    tokenizer_json = build_tokenizer_json(proto, src)
    trainer = proto.trainer_spec
    pieces = proto.pieces

    def piece(i: int) -> str | None:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    bos, eos, unk, pad = piece(trainer.bos_id), piece(trainer.eos_id), piece(trainer.unk_id), piece(trainer.pad_id)
    specials = {t["id"]: t for t in tokenizer_json["added_tokens"]}
    config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": bos is not None,
        "add_eos_token": False,
        # legacy=True: every chunk between special tokens gets its own dummy prefix, as when Meta's code
        # encodes "[INST] ..." after <s>; legacy=False would give "[INST]" without the leading "▁".
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length if model_max_length is not None else int(1e30),
        "added_tokens_decoder": {
            str(i): {k: v for k, v in t.items() if k != "id"} for i, t in sorted(specials.items())
        },
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {name: {"content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
                   for name, tok in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad))
                   if tok is not None}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("tokenizer.json", json.dumps(tokenizer_json, ensure_ascii=False, indent=1)),
        ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2)),
        ("special_tokens_map.json", json.dumps(special_map, ensure_ascii=False, indent=2)),
    ):
        with atomic_file(out / name, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        written.append(str(out / name))
    if not (out / "tokenizer.model").exists() or not os.path.samefile(src, out / "tokenizer.model"):
        with open(src, "rb") as s, atomic_file(out / "tokenizer.model") as f:
            shutil.copyfileobj(s, f)
        written.append(str(out / "tokenizer.model"))
    return written


def build_tokenizer_json(proto: Any, name: str | os.PathLike[str] = "model") -> dict[str, Any]:
    """The `tokenizers` serialisation (tokenizer.json as a dict) of a SentencePiece BPE ModelProto."""
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != 2:  # BPE
        raise TokenizerError(
            f"{name}: only BPE SentencePiece models can be exported, this one is type {trainer.model_type}"
        )
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces or not norm.escape_whitespaces:
        raise TokenizerError(
            f"{name}: only the identity normaliser of Llama / Mistral tokenizers (no charsmap, "
            "remove_extra_whitespaces false, escape_whitespaces true) is supported for export"
        )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == NORMAL}
    if any(" " in piece for piece in normal):
        raise TokenizerError(f"{name}: a piece holds a plain space; tokenizer.json merges cannot express it")
    ranked = []
    for merged, (score, i) in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    merges = [f"{left} {right}" for _, _, left, right in sorted(ranked)]

    user_defined = [piece for piece, _, kind in pieces if kind == USER_DEFINED]
    added = [
        {"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, (piece, _, kind) in enumerate(pieces)
        if kind in (CONTROL, UNKNOWN)
    ]
    normalizers: list[dict[str, Any]] = []
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": SPACE})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    pre_tokenizer = None
    if user_defined:
        # SentencePiece emits user-defined pieces whole wherever they occur (after normalisation).
        pattern = "|".join(re.escape(p.replace(" ", SPACE)) for p in sorted(user_defined, key=len, reverse=True))
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}
    decoders: list[dict[str, Any]] = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}]
    if trainer.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = pieces[trainer.bos_id][0] if 0 <= trainer.bos_id < len(pieces) else None
    post_processor = None
    if bos is not None:
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}},
        }
    unk = pieces[trainer.unk_id][0] if 0 <= trainer.unk_id < len(pieces) else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": unk,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": bool(trainer.byte_fallback),
            # With user-defined pieces, a chunk that is a whole vocabulary entry is taken as is, so
            # "<tool>" is not re-spelled from characters; otherwise BPE runs on every chunk.
            "ignore_merges": bool(user_defined),
            "vocab": vocab,
            "merges": merges,
        },
    }


def _load_proto(path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:
        raise TokenizerError("exporting a tokenizer reads the SentencePiece model proto, which needs protobuf: "
                             "pip install protobuf") from None
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError type
        raise TokenizerError(f"{path} is not a SentencePiece model: {e}") from None
    if not proto.pieces:
        raise TokenizerError(f"{path} is not a SentencePiece model: it has no pieces")
    return proto
