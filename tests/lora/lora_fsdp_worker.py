"""A few LoRA training steps of a tiny model, in one process or on every rank of a torchrun group (FSDP2 over
gloo, every block recomputed in the backward pass), for test_lora_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/lora/lora_fsdp_worker.py OUT_DIR

Each rank trains on its half of one global batch; the loss it backpropagates is its summed cross-entropy
over the global token count times the number of ranks, since FSDP2 averages gradients over ranks: so the
update is the one-process update of the whole batch's mean loss. Rank 0 writes, per preset, the losses, the
gathered adapters and the gathered base to OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.lora import LoraConfig, apply_lora, base_state_dict, lora_state_dict
from lmforge.parallel import ParallelConfig, full_model_state_dict, init_distributed, parallelize, training_mesh

PRESETS = ("tiny", "tiny-moe")
STEPS, BATCH, T = 3, 4, 16


def lora_model(preset: str) -> Transformer:
    torch.manual_seed(0)
    return apply_lora(Transformer(ModelConfig.from_name(preset)), LoraConfig(rank=4, alpha=8.0))


def batch() -> torch.Tensor:
    return torch.randint(0, 512, (BATCH, T + 1), generator=torch.Generator().manual_seed(3))


def train(net, model: Transformer, rank: int, world: int) -> list[float]:
    """STEPS AdamW steps on this rank's rows of `batch()`; the losses of the whole batch (mean over tokens)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    rows = batch().chunk(world)[rank]
    losses = []
    for _ in range(STEPS):
        logits = net(rows[:, :-1])
        loss_sum = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        (loss_sum / (BATCH * T) * world).backward()
        opt.step()
        opt.zero_grad()
        total = loss_sum.detach()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / (BATCH * T))
    return losses


def main(out: Path) -> None:
    rank, world = init_distributed("cpu")
    torch.set_num_threads(1)
    mesh = training_mesh(torch.device("cpu"), 1)
    for preset in PRESETS:
        model = lora_model(preset)
        parallel = ParallelConfig(mode="fsdp", activation_checkpointing="full")
        net = parallelize(model, parallel, torch.device("cpu"), mesh)
        losses = train(net, model, rank, world)
        adapters, base = lora_state_dict(model), base_state_dict(full_model_state_dict(model))  # collectives
        if rank == 0:
            from safetensors.torch import save_file

            save_file(adapters, out / f"{preset}-adapters.safetensors")
            save_file(base, out / f"{preset}-base.safetensors")
            (out / f"{preset}-losses.json").write_text(json.dumps(losses))
    dist.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    dist.destroy_process_group()
