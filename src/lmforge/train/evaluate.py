"""Validation loss and perplexity: used during pre-training and by `lmforge eval loss`.

    loss = sum of -log p(target) over the masked positions of the batches / number of those positions
    perplexity = exp(loss)

The same samples every time (the split in order, each sample at most once), so successive validations of a
run compare, and a validation over the whole split equals `lmforge eval loss` of the same model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from lmforge.data.loader import Batch
from lmforge.train.losses import chunked_cross_entropy


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CUDA for "auto" / "bf16"; nothing (fp32) on the CPU for "auto" and for "fp32".

    NOTE: "bf16" on the CPU is allowed (CPU autocast exists) but is slower than fp32 on most CPUs.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    batches: Iterable,
    *,
    device: torch.device,
    precision: str = "auto",
    loss_chunk: int = 2048,
    document_masking: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[float, int]:
    """(mean loss, number of target tokens) of `model` over `batches` (loader `Batch`es), summed over the
    ranks of `group` (default: all; under tensor parallelism, the data-parallel ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for batch in batches:
        b = batch.to(device, non_blocking=True)
        doc = b.document_ids if document_masking else None
        with autocast_context(device, precision):
            hidden = model(b.inputs, b.positions, document_ids=doc, return_hidden=True)
            total += chunked_cross_entropy(hidden, model.output.weight, b.targets, b.loss_mask, loss_chunk)
        count += b.loss_mask.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, group=group)
        dist.all_reduce(count, group=group)
    model.train(was_training)
    n = int(count.item())
    return (total.item() / n if n else math.nan), n


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def split_batch_count(loader, max_batches: int | None = None) -> int:
    """How many batches `split_batches(loader, max_batches)` yields (global batches, the last one partial)."""
    n = math.ceil(loader.num_samples / (loader.batch_size * loader.world_size))
    return n if max_batches is None else min(n, max_batches)


def split_batches(loader, max_batches: int | None = None) -> Iterator:
    """Each sample of an unshuffled `PackedLoader`'s first epoch at most once: this rank's share of every
    global batch, the last one cut short (and skipped where this rank has no row left), or only the first
    `max_batches` global batches.

    Worked example, S = 10 samples, batch_size B = 2, world_size W = 2: global batches cover cursor positions
    [0, 4), [4, 8), [8, 12); in the last one rank 0 keeps position 8 (its second row, 10, is past S) and
    rank 1 keeps position 9.
    """
    B, W, S = loader.batch_size, loader.world_size, loader.num_samples
    for _ in range(split_batch_count(loader, max_batches)):
        first = loader.cursor + loader.rank  # cursor position of this rank's row 0; row k is first + k * W
        batch = next(loader)
        rows = min(B, max(0, math.ceil((S - first) / W)))
        if rows:
            yield Batch(*(t[:rows] if t is not None else None for t in (
                batch.inputs, batch.targets, batch.loss_mask, batch.document_ids, batch.positions)))


def evaluate(
    model: str,
    data: str,
    split: str = "validation",
    seq_len: int | None = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str | None = None,
    precision: Literal["auto", "bf16", "fp32"] = "auto",
    document_masking: bool = False,
) -> dict:
    """Loss and perplexity of a model on one split of token shards (`lmforge eval loss`).

    Reads every sample of the split once, in order (the samples of PackedLoader: seq_len tokens each, the
    stream's tail shorter than one sample left out), unless max_batches stops it earlier.

    Args:
        model: Model folder, ours (e.g. RUN/model) or Hugging Face's.
        data: Folder written by `lmforge data prepare`.
        split: "validation" or "train".
        seq_len: Tokens per sample; None uses the model's max_seq_len.
        batch_size: Samples per forward pass.
        max_batches: Stop after this many batches (None: the whole split).
        device: "cpu", "cuda" or "cuda:N"; None picks CUDA when available.
        precision: "auto" is bf16 autocast on CUDA, fp32 on the CPU.
        document_masking: Attend only within each document (as a model trained with it expects).
    """
    from tqdm import tqdm

    from lmforge.data import PackedLoader
    from lmforge.data.shards import read_manifest
    from lmforge.devices import resolve_device
    from lmforge.models.checkpoint import check_model_folder, load_model

    dev = resolve_device(device)
    check_model_folder(model)
    manifest = read_manifest(data)  # before loading the weights: a wrong data folder fails fast
    net = load_model(model, device=dev, dtype=torch.float32)
    check_vocabulary(manifest, net.config.vocab_size, data)
    if seq_len is not None and seq_len > net.config.max_seq_len:
        # the same refusal as pretrain and generate: positions past max_seq_len were never trained
        raise ValueError(f"seq_len ({seq_len}) exceeds the model's max_seq_len ({net.config.max_seq_len})")
    loader = PackedLoader(data, split=split, seq_len=seq_len or net.config.max_seq_len, batch_size=batch_size,
                          shuffle=False)
    batches = tqdm(split_batches(loader, max_batches), desc=f"eval [{split}]", unit=" batches",
                   total=split_batch_count(loader, max_batches))
    loss, tokens = evaluate_loss(net, batches, device=dev, precision=precision, document_masking=document_masking)
    result = {"model": str(model), "data": str(data), "split": split, "loss": loss, "perplexity": perplexity(loss),
              "tokens": tokens}
    print(f"{model} on {data} [{split}]: loss {loss:.4f}, perplexity {perplexity(loss):.3f} over {tokens:,} tokens")
    return result


def check_vocabulary(manifest: dict, model_vocab: int, where: str | Path) -> None:
    """Refuse token shards whose ids can fall outside the model's embedding table."""
    vocab = manifest.get("settings", {}).get("vocab_size")
    if vocab is not None and vocab > model_vocab:
        raise ValueError(f"{where} was tokenized with a vocabulary of {vocab} but the model has vocab_size "
                         f"{model_vocab}: ids would index past its embedding table")
