"""`lmforge generate` and `lmforge chat`: text in, text out, through `lmforge.infer.generate`.

    lmforge generate runs/my-model --prompts "Once upon a time" --sampling.temperature 0
    lmforge generate runs/my-model --prompt_file prompts.jsonl --format jsonl --output out.jsonl
    lmforge chat runs/my-model --system "Answer in French."

With several prompts, `--format text` prints each completion after its prompt in [brackets], one record
per prompt, separated by a line of dashes; with one prompt, the completion alone, streamed as it is decoded.
A completion is the text that follows its prompt, so it keeps its first space (" is ..." after "The module").
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.infer.decode_step import DecodeMode
from lmforge.infer.generate import GenerationError, generate_stream
from lmforge.infer.sampling import SamplingParams

Dtype = Literal["float32", "bfloat16", "float16"]
SEPARATOR = "-" * 40  # between the records of several prompts in --format text


def _load(model: Path, tokenizer: Path | None, device: str | None, dtype: Dtype | None, head: str = "lm"):
    """(model in eval mode, Tokenizer) of a model folder, checked; `head` "reward" loads a reward model."""
    from lmforge.devices import resolve_device
    from lmforge.models.checkpoint import check_model_folder, load_model
    from lmforge.tokenizer.tokenizer import Tokenizer

    dev = resolve_device(device)
    model = check_model_folder(model)  # what is wrong with the model path comes before the tokenizer
    tok_path = Path(tokenizer) if tokenizer is not None else model / "tokenizer.model"
    if not tok_path.exists():
        raise FileNotFoundError(f"no tokenizer: {tok_path} does not exist (pass --tokenizer PATH/tokenizer.model)")
    net = load_model(model, device=dev, dtype=getattr(torch, dtype) if dtype else None, head=head).eval()
    tok = Tokenizer(tok_path)
    if tok.vocab_size > net.config.vocab_size:
        raise GenerationError(f"tokenizer {tok_path} has {tok.vocab_size} pieces, the model only {net.config.vocab_size}")
    return net, tok


def _context_note(lengths: list[int], sampling: SamplingParams, config) -> str | None:
    """The one line that says max_new_tokens will be cut short by a full-attention model's context, or None.

    Prompt and output share the context: a prompt of L tokens leaves max_seq_len - L new tokens at most.
    """
    if config.sliding_window is not None:
        return None
    rooms = [config.max_seq_len - n for n in lengths]
    short = [i for i, room in enumerate(rooms) if room < sampling.max_new_tokens]
    if not short:
        return None
    i = min(short, key=lambda j: rooms[j])
    others = f" ({len(short)} prompts are limited)" if len(short) > 1 else ""
    return (f"note: max_new_tokens {sampling.max_new_tokens} is more than the context leaves: the model's context "
            f"is {config.max_seq_len} tokens, prompt included, so prompt {i + 1} ({lengths[i]} tokens) gets at "
            f"most {rooms[i]} new tokens{others}")


def _prompt_label(item: str | list[dict]) -> str:
    """How a prompt is shown before its completion: the text, or a dialogue's last message."""
    return item if isinstance(item, str) else str(item[-1].get("content", "")) if item else ""


def _fuse_on_cuda(net) -> None:
    """One product for q, k, v and one for w1, w3 in every layer (lmforge.infer.fuse), where it pays: on CUDA."""
    from lmforge.infer.fuse import fuse_projections

    if next(net.parameters()).is_cuda:
        fuse_projections(net)


def _read_prompts(prompts: list[str] | str | None, prompt_file: Path | None) -> list[str | list[dict]]:
    """Prompts from --prompts and --prompt_file: a .jsonl file holds one JSON string, {"prompt": str} or
    {"messages": [...]} (a chat dialogue) per line; any other file one prompt per non-empty line."""
    out: list[str | list[dict]] = [prompts] if isinstance(prompts, str) else list(prompts or [])
    if prompt_file is not None:
        path = Path(prompt_file)
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix != ".jsonl":
            out += [line for line in lines if line.strip()]
        for n, line in enumerate(lines, 1) if path.suffix == ".jsonl" else ():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise GenerationError(f"{path}:{n}: not JSON ({e.msg})") from None
            if isinstance(item, dict) and ("prompt" in item or "messages" in item):
                item = item.get("prompt", item.get("messages"))
            if not isinstance(item, (str, list)):
                raise GenerationError(f'{path}:{n}: expected a string, {{"prompt": str}} or {{"messages": [...]}}')
            out.append(item)
    if not out:
        raise GenerationError("no prompts: pass --prompts TEXT (repeat with --prompts+ TEXT) or --prompt_file FILE")
    return out


def generate_cli(
    model: Path,
    prompts: list[str] | str | None = None,
    prompt_file: Path | None = None,
    tokenizer: Path | None = None,
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=128),
    chat: bool = False,
    system: str | None = None,
    format: Literal["text", "jsonl"] = "text",
    output: Path | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    prefill_chunk: int | None = None,
    decode_mode: DecodeMode = "eager",
    device: str | None = None,
    dtype: Dtype | None = None,
    tensor_parallel: int = 1,
) -> None:
    """Generate continuations of text prompts with a model folder (ours, Hugging Face or Meta).

    Args:
        model: model folder; its tokenizer.model is used unless --tokenizer is given.
        prompts: one prompt, or several (a JSON list, or --prompts+ TEXT repeated).
        prompt_file: more prompts: a .jsonl file (a JSON string, {"prompt": ...} or {"messages": [...]} per
            line) or a text file (one prompt per non-empty line).
        tokenizer: a SentencePiece tokenizer.model.
        sampling: sampling parameters (--sampling.temperature 0 for greedy, --sampling.stop+ "###", ...).
        chat: wrap each text prompt as a user message in Llama 2's chat format.
        system: system message for --chat prompts.
        format: "text" (the completions, streamed when there is one prompt) or "jsonl" (one JSON object per
            prompt: index, prompt, text, token_ids, finish_reason, and logprobs when asked).
        output: write to this file (atomically) instead of standard output; an existing file is kept unless
            --overwrite true.
        overwrite: replace an existing --output file.
        batch_size: prompts generated together.
        prefill_chunk: pre-fill chunk size (default: the window of a sliding-window model, else the prompt).
        decode_mode: eager, compile, cuda_graph or compile+cuda_graph (the graph modes need CUDA).
        device: cpu, cuda or cuda:N (default: cuda when available).
        dtype: cast the weights (default: as stored).
        tensor_parallel: split the attention and feed-forward weights over this many processes, for a model
            too large for one GPU: `torchrun --nproc_per_node N -m lmforge.cli generate ... --tensor_parallel N`.
            Every rank computes the same tokens; rank 0 writes them.
    """
    from lmforge.io import atomic_file

    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    if output is not None and Path(output).exists() and not overwrite:
        raise GenerationError(f"--output {output} exists; pass --overwrite true to replace it")
    items = _read_prompts(prompts, prompt_file)
    rank = _join_tensor_parallel(tensor_parallel, device)  # before loading, so "cuda" means this rank's GPU
    net, tok = _load(model, tokenizer, device, dtype)
    if tensor_parallel > 1:
        _shard(net, tensor_parallel)
    _fuse_on_cuda(net)
    if rank != 0:
        output, stream_text_allowed = Path(os.devnull), False
    else:
        stream_text_allowed = True
    ids = [_encode(tok, item, chat, system) for item in items]
    note = _context_note([len(i) for i in ids], sampling, net.config)
    if note is not None and rank == 0:
        print(f"lmforge: {note}", file=sys.stderr)
    stream_text = stream_text_allowed and format == "text" and output is None and len(items) == 1

    def records():
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            results = [dict(text="", token_ids=[], logprobs=[] if sampling.logprobs else None) for _ in batch]
            kwargs = dict(prefill_chunk=prefill_chunk, decode_mode=decode_mode)
            for e in generate_stream(net, tok, batch, sampling, **kwargs):
                r = results[e.index]
                r["text"] += e.text
                r["token_ids"].append(e.token_id)
                if r["logprobs"] is not None:
                    r["logprobs"].append(e.logprob)
                if e.finish_reason:
                    r["finish_reason"] = e.finish_reason
                if stream_text:
                    sys.stdout.write(e.text)
                    sys.stdout.flush()
            for i, r in enumerate(results):
                yield {"index": start + i, "prompt": items[start + i], **r}

    def write(f):
        for rec in records():
            if format == "jsonl":
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            elif stream_text:
                f.write("\n")
            elif len(items) == 1:
                f.write(rec["text"] + "\n")
            else:
                head = SEPARATOR + "\n" if rec["index"] else ""
                f.write(f"{head}[{_prompt_label(rec['prompt'])}]{rec['text']}\n")

    if output is None:
        write(sys.stdout)
    elif rank != 0:
        with open(output, "w") as f:
            write(f)
    else:
        with atomic_file(output, "w") as f:
            write(f)


def _join_tensor_parallel(tp: int, device: str | None) -> int:
    """Join torchrun's process group for tensor parallelism of degree `tp`; this process's rank (0 if tp == 1)."""
    if tp == 1:
        return 0
    if tp < 1:
        raise GenerationError(f"tensor_parallel must be >= 1, got {tp}")
    from lmforge.devices import resolve_device
    from lmforge.parallel import init_distributed

    device_type = resolve_device(device).type
    rank, world = init_distributed(device_type)
    if world != tp:
        raise GenerationError(f"--tensor_parallel {tp} needs {tp} processes (torchrun --nproc_per_node {tp}); "
                              f"this run has {world}")
    return rank


def _shard(net, tp: int) -> None:
    """Shard `net` over the process group, and give every rank one sampling seed so they draw the same tokens."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel import apply_tensor_parallel

    device = next(net.parameters()).device
    apply_tensor_parallel(net, init_device_mesh(device.type, (tp,)))
    seed = torch.randint(0, 2**62, (1,), device=device)
    dist.broadcast(seed, src=0)
    torch.manual_seed(int(seed.item()))


def _encode(tok, item: str | list[dict], chat: bool, system: str | None) -> list[int]:
    from lmforge.tokenizer.chat import encode_chat

    if isinstance(item, list):  # a dialogue from a .jsonl file
        messages = ([{"role": "system", "content": system}] if system else []) + item
        return encode_chat(tok, messages, add_generation_prompt=True).ids
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": item}]
        return encode_chat(tok, messages, add_generation_prompt=True).ids
    return tok.encode(item, bos=True)


def chat(
    model: Path,
    tokenizer: Path | None = None,
    system: str | None = None,
    sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=512),
    decode_mode: DecodeMode = "eager",
    device: str | None = None,
    dtype: Dtype | None = None,
) -> None:
    """Chat with a model in the terminal (Llama 2 chat format); /reset starts a new dialogue, /exit quits.

    Reads one user message per line from standard input and streams each answer. Commands: /reset starts
    a new dialogue, /exit (or end of input) quits. When the dialogue outgrows a full-attention model's
    context, the oldest exchanges are dropped (the system message stays).

    Args:
        model: model folder; its tokenizer.model is used unless --tokenizer is given.
        tokenizer: a SentencePiece tokenizer.model.
        system: the system message of the dialogue.
        sampling: sampling parameters of every answer.
        decode_mode: eager, compile, cuda_graph or compile+cuda_graph (the graph modes need CUDA).
        device: cpu, cuda or cuda:N (default: cuda when available).
        dtype: cast the weights (default: as stored).
    """
    from lmforge.tokenizer.chat import encode_chat

    net, tok = _load(model, tokenizer, device, dtype)
    _fuse_on_cuda(net)
    print(f"chatting with {model} (Llama 2 chat format): type a message and press Enter; /reset starts a new "
          "dialogue, /exit quits", file=sys.stderr)
    head = [{"role": "system", "content": system}] if system else []
    noted = False
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    # NOTE: each turn re-encodes and pre-fills the whole dialogue (no cache kept between turns): Llama 2's
    # format encodes each exchange on its own, and a pre-fill costs about one decode step per chunk.
    limit = net.config.max_seq_len if net.config.sliding_window is None else None
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        user = line.strip()
        if not user:
            continue
        if user == "/reset":
            history = []
            print("(new dialogue)", flush=True)
            continue
        history.append({"role": "user", "content": user})
        ids = encode_chat(tok, head + history, add_generation_prompt=True).ids
        while limit is not None and len(ids) >= limit and len(history) > 1:
            history = history[2:]  # drop the oldest exchange
            print("(dropped the oldest exchange to fit the context)", file=sys.stderr)
            ids = encode_chat(tok, head + history, add_generation_prompt=True).ids
        note = None if noted else _context_note([len(ids)], sampling, net.config)
        if note is not None:
            print(f"({note})", file=sys.stderr)
            noted = True
        print("assistant> " if interactive else "", end="", flush=True)
        answer = ""
        try:
            for e in generate_stream(net, tok, [ids], sampling, decode_mode=decode_mode):
                # NOTE: an answer follows "[/INST]" with a space, part of the format: not shown
                text = e.text if answer else e.text.lstrip()
                answer += text
                print(text, end="", flush=True)
        except GenerationError as err:  # e.g. one message longer than the whole context
            history.pop()
            print(f"(error: {err})", flush=True)
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": answer})


__all__ = ["chat", "generate_cli"]
