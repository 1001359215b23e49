"""`lmforge tokenizer train`: a SentencePiece BPE tokenizer with Llama 2's settings (vocabulary 32,000, digits
split, byte fallback, <unk> <s> </s> = 0 1 2).

The trainer specification below is the one stored in Llama 2's own tokenizer.model (print it with
`sentencepiece_model_pb2.ModelProto.FromString(data).trainer_spec`), minus what only concerns Meta's run
(input paths, 80 threads, 200M sampled sentences, max_sentence_length 4192 bytes; ours is 65536):

    model_type BPE, vocab_size 32000, split_digits, byte_fallback, allow_whitespace_only_pieces,
    character_coverage 0.99995, unk/bos/eos = 0/1/2 (<unk> <s> </s>), pad_id -1 (none),
    normalizer "identity", add_dummy_prefix true, remove_extra_whitespaces false.

With these settings `decode(encode(x)) == x` for every valid Unicode text without U+2581: the identity
normaliser changes nothing, spaces are kept (runs of spaces become whitespace-only pieces such as "▁▁▁▁"),
the dummy prefix "▁" added in front is removed again by the decoder, and any character the vocabulary lacks
(`\\n`, emoji, rare scripts) becomes its UTF-8 bytes <0x..> instead of <unk>.

Worked example of the pieces (vocabulary 600 trained on the test corpus):

    "x = 12\\n    y"  ->  ▁x ▁= ▁ 1 2 <0x0A> ▁▁▁▁ y

NOTE: the corpus reaches SentencePiece one line at a time (documents split at "\\n", empty lines dropped),
as with Meta's line-per-sentence text files. So no piece spans a newline, and "\\n" itself is a byte
piece <0x0A> in the vocabulary (as in Llama 2 and Mistral), never a merged piece.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from lmforge.data.sources import DataError, iter_documents, resolve_sources
from lmforge.io import claim_output_dir, output_dir
from lmforge.tokenizer.tokenizer import Tokenizer, TokenizerError

MODEL_FILE = "tokenizer.model"
INFO_FILE = "tokenizer_train.json"

# The fixed part of Llama 2's trainer spec; every other option is an argument of train_tokenizer.
LLAMA2_SPEC = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    allow_whitespace_only_pieces=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    shuffle_input_sentence=True,
    hard_vocab_limit=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
)


def train_tokenizer(
    data: list[str] | str | None = None,
    out_dir: str = "runs/tokenizer",
    vocab_size: int = 32000,
    text_field: str = "text",
    user_defined_symbols: list[str] | None = None,
    control_symbols: list[str] | None = None,
    character_coverage: float = 0.99995,
    input_sentence_size: int = 0,
    max_sentence_length: int = 65536,
    num_threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = False,
) -> str:
    """Train a SentencePiece BPE tokenizer with Llama 2's settings and write OUT_DIR/tokenizer.model.

    Args:
        data: a path or a list of paths ("--data a.txt", "--data [a.txt,b.jsonl]" or "--data+ a --data+ b"):
            text files (.txt, .md, any name), .jsonl, .parquet, folders (walked recursively) or Hugging Face
            datasets saved with save_to_disk. None: the embedded corpus (pydoc topics + stdlib docstrings).
        out_dir: folder to write tokenizer.model (and tokenizer_train.json, the arguments and corpus stats);
            it must be missing, empty or a folder lmforge wrote (replaced only with --overwrite true).
        vocab_size: number of pieces, including <unk> <s> </s> and the 256 byte pieces (Llama 2: 32000).
        text_field: the jsonl field, parquet column or dataset column holding the text.
        user_defined_symbols: extra pieces always kept whole when they occur in text (e.g. "<tool>").
        control_symbols: extra special pieces that never come from text, only as ids (like <s> and </s>).
        character_coverage: share of characters kept as pieces; rarer characters go to byte pieces.
        input_sentence_size: sample this many lines (sentences) for training; 0 uses them all.
        max_sentence_length: longest line used for training, in bytes; longer lines are skipped.
        num_threads: trainer threads (default: all cores).
        seed: seed of SentencePiece's sampling and shuffling of lines.
        overwrite: replace OUT_DIR if lmforge wrote it (a folder of anything else is never replaced).
        verbose: show SentencePiece's own training log.

    Returns:
        The path of the written tokenizer.model.
    """
    out = Path(out_dir)
    model_path = out / MODEL_FILE
    claim_output_dir(out, overwrite)  # before training: a refusal should not cost the training time
    symbols = [*(user_defined_symbols or []), *(control_symbols or [])]
    clash = sorted({"<unk>", "<s>", "</s>"} & set(symbols)) or sorted({s for s in symbols if symbols.count(s) > 1})
    if clash:
        raise TokenizerError(f"special pieces {clash} are given twice (<unk> <s> </s> are always ids 0 1 2)")
    start = time.perf_counter()
    sources = resolve_sources(data)
    # A first pass checks every input (a bad line would otherwise surface only after SentencePiece has
    # trained on everything before it) and counts what the trainer will see; reading is cheap next to training.
    stats = {"documents": 0, "lines": 0, "bytes": 0}
    for doc in tqdm(iter_documents(sources, text_field), desc="checking corpus", unit=" docs", leave=False):
        stats["documents"] += 1
        stats["bytes"] += len(doc.text.encode("utf-8"))
        stats["lines"] += sum(1 for line in doc.text.split("\n") if line)
    if stats["lines"] == 0:
        raise DataError(f"no text to train on in {[s.path for s in sources]}")
    failure: list[BaseException] = []

    def lines() -> Iterator[str]:
        # NOTE: an exception raised inside sentence_iterator surfaces from SentencePiece's C++ side as a
        # generic error; keep ours (a DataError names the file and line) and end the stream instead.
        try:
            for doc in iter_documents(sources, text_field):
                yield from (line for line in doc.text.split("\n") if line)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the trainer returns
            failure.append(e)

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=model,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            user_defined_symbols=user_defined_symbols or [],
            control_symbols=control_symbols or [],
            minloglevel=0 if verbose else 2,
            **LLAMA2_SPEC,
        )
    except RuntimeError as e:
        if failure:
            raise failure[0] from None
        message = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        too_high = re.search(r"Vocabulary size (is )?too high.*", message)
        if too_high:
            raise TokenizerError(
                f"vocab_size={vocab_size} is too large for this corpus ({stats['lines']} lines, {stats['bytes']} "
                f"bytes): SentencePiece says {too_high.group(0)!r}. Use a smaller vocab_size or more text."
            ) from None
        raise TokenizerError(f"SentencePiece training failed: {message}") from None
    if failure:
        raise failure[0]

    info = {
        "vocab_size": vocab_size,
        "data": [s.path for s in sources],
        "text_field": text_field,
        "user_defined_symbols": user_defined_symbols or [],
        "control_symbols": control_symbols or [],
        "character_coverage": character_coverage,
        "input_sentence_size": input_sentence_size,
        "max_sentence_length": max_sentence_length,
        "seed": seed,
        "corpus": stats,
        "seconds": round(time.perf_counter() - start, 3),
        "sentencepiece": spm.__version__,
        "spec": LLAMA2_SPEC,
    }
    with output_dir(out, "tokenizer train", overwrite) as tmp:
        (tmp / MODEL_FILE).write_bytes(model.getvalue())
        tok = Tokenizer(tmp / MODEL_FILE)
        info["sha256"] = tok.sha256
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    size = len(model.getvalue())
    print(f"wrote {model_path}: {tok.vocab_size} pieces, {size / 1024:.0f} KiB, trained on "
          f"{stats['lines']:,} lines ({stats['bytes'] / 1e6:.1f} MB) in {info['seconds']:.1f} s", file=sys.stderr)
    return str(model_path)
