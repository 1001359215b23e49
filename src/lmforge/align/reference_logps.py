"""Sequence log-probabilities of answers, and DPO's cache of the frozen reference model's.

Notation: a row is prompt + answer as token ids x_0 .. x_{L-1} (ending with the answer's </s>); `mask` marks
the answer's tokens. The answer's log-probability under a language model is

    log pi(y | x) = sum over answer positions t >= 1 of log p(x_t | x_0 .. x_{t-1})

computed from the hidden states of x_0 .. x_{L-2} through `train.losses.token_logprobs`, the per-token form of
the chunked cross-entropy, so (rows, T, V) logits never exist whole (`sequence_logprobs`).

NOTE: not the fused linear cross-entropy of pre-training (train/linear_ce.py): it computes its gradients in the
forward pass, which is only possible for one scalar at the end of the graph; DPO needs one log-probability per
row, each with its own upstream gradient, and a fused version per row would keep a (V, d) weight gradient per
row. The chunks here recompute their logits in the backward pass instead.

DPO needs log pi_ref(y | x) of both answers of every pair, under a model that never changes: they are computed
once, before the first step, and cached in the run folder (`fill_reference`):

    RUN/reference/
      key.json                          what the cache is of: a digest of every pair's token ids and masks, and
                                        the reference model's weight fingerprint (lmforge.lora.base_fingerprint)
      s{source}-{split}-{chunk:05d}.npy (pairs in the chunk, 2) float32: the chosen, the rejected log-prob

Each chunk of `CHUNK` pairs is written atomically when complete, so a run stopped during the pass (SIGTERM, a
crash) continues from the chunks it has; a key that does not match (other data, another reference) empties
the folder first.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lmforge.align.preference_data import PairSet, pair_batch
from lmforge.io import atomic_file
from lmforge.train.evaluate import autocast_context
from lmforge.train.losses import token_logprobs

CHUNK = 1024  # pairs per cache file


def sequence_logprobs(train_net: torch.nn.Module, net: torch.nn.Module, tokens: Tensor, mask: Tensor,
                      loss_chunk: int = 2048) -> Tensor:
    """log pi(answer | prompt) of each row, (B,) float32 (module docstring).

    tokens: (B, T) right-padded rows; mask: (B, T) bool, True on the answer's tokens. train_net: what to call
    (the model or its data-parallel wrapper); net: the Transformer (its output projection).
    """
    hidden = train_net(tokens[:, :-1], return_hidden=True)  # (B, T-1, d): position t predicts token t + 1
    logp = token_logprobs(hidden, net.output.weight, tokens[:, 1:], loss_chunk)  # (B, T-1)
    return (logp * mask[:, 1:]).sum(-1)


def _name(source: int, split: str, start: int) -> str:
    return f"s{source}-{split}-{start // CHUNK:05d}.npy"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _key(sets: list[PairSet], fingerprint: str) -> str:
    digest = hashlib.sha256(fingerprint.encode())
    for s in sets:
        for split in ("train", "validation"):
            for p in s.splits[split]:
                for ids, mask in zip(p.ids, p.mask):
                    digest.update(ids.tobytes())
                    digest.update(np.packbits(mask).tobytes())
            digest.update(b"|")
    return digest.hexdigest()


@torch.no_grad()
def fill_reference(sets: list[PairSet], folder: Path, reference: torch.nn.Module, fingerprint: str, *,
                   device: torch.device, precision: str, batch_pairs: int, loss_chunk: int, is_main: bool = True,
                   progress: bool = True) -> None:
    """Set `pair.reference` of every pair of `sets` from the cache in `folder`, computing what is missing with
    `reference` (module docstring), whose weights have `fingerprint` (lmforge.lora.base_fingerprint of its
    plain state dict). Every rank computes (the forwards of a sharded model are collective); rank 0
    (`is_main`) writes."""
    key = _key(sets, fingerprint)
    key_file = folder / "key.json"
    if is_main:
        if key_file.is_file() and json.loads(key_file.read_text()).get("key") != key:
            shutil.rmtree(folder)  # another data set or reference: nothing in it applies
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(key_file, "w", encoding="utf-8") as f:
            f.write(json.dumps({"key": key}) + "\n")
    _barrier()
    jobs = [(k, split, c) for k, s in enumerate(sets) for split in ("train", "validation")
            for c in range(0, len(s.splits[split]), CHUNK)]
    # NOTE: every rank decides what is missing before rank 0 writes anything new: a rank that found a chunk
    # written meanwhile would skip a forward pass that is collective under FSDP.
    cached = {job: (folder / _name(*job)).is_file() for job in jobs}
    _barrier()
    was_training = reference.training
    reference.eval()
    try:
        for k, split, start in tqdm(jobs, desc="reference log-probs", unit="chunk", disable=not progress):
            pairs = sets[k].splits[split][start : start + CHUNK]
            path = folder / _name(k, split, start)
            if cached[k, split, start]:
                values = np.load(path)
            else:
                rows = []
                for i in range(0, len(pairs), batch_pairs):
                    b = pair_batch(pairs[i : i + batch_pairs]).to(device)
                    with autocast_context(device, precision):
                        logp = sequence_logprobs(reference, reference, b.tokens, b.mask, loss_chunk)
                    m = len(b.pairs)
                    rows.append(torch.stack([logp[:m], logp[m:]], dim=1).float().cpu())
                values = torch.cat(rows).numpy()
                if is_main:
                    with atomic_file(path, "wb") as f:
                        np.save(f, values)
            for p, (c, r) in zip(pairs, values.tolist()):
                p.reference = (c, r)
    finally:
        reference.train(was_training)
    _barrier()  # every chunk written before any rank reads the folder again


__all__ = ["CHUNK", "fill_reference", "sequence_logprobs"]
