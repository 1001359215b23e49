"""Parallelism, applied from outside the model (which stays single-device), in one place and a fixed order.
Training (`lmforge pretrain`) and inference (`lmforge generate --tensor_parallel`) both use it, so it sits beside
them.

    tensor parallelism  ->  activation checkpointing  ->  torch.compile per block  ->  FSDP2 per block, root
                                                                                       (or DDP instead of FSDP2)

The processes form a 2-D mesh (dp, tp): tensor parallelism splits each block's weights over the tp ranks
(apply_tensor_parallel), FSDP2 shards everything over the dp ranks, and the data loader hands each dp rank its
own batch (all tp ranks of one dp rank read the same one). Worked example, 4 processes, tensor_parallel 2:
mesh [[0, 1], [2, 3]]; ranks 0 and 1 split the block weights of dp shard 0 and read batch 0, ranks 2 and 3
those of shard 1 and batch 1.

The model code stays single-device: this file wraps its blocks. Launch several processes with torchrun (one
per GPU, or CPU processes with gloo); `init_distributed()` reads torchrun's environment.

    torchrun --nproc_per_node 8 -m lmforge.cli pretrain --config configs/llama2-7b.yaml --parallel.mode fsdp

FSDP2 (`fully_shard`) shards every parameter, gradient and optimizer state over the ranks; with the mixed
precision policy below, parameters are all-gathered in bf16 for compute while gradients are reduced in fp32
and the optimizer keeps fp32 master weights. DDP keeps a full replica per rank and all-reduces gradients.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from lmforge.models.transformer import Transformer


@dataclass
class ParallelConfig:
    """How the model is spread over processes and made fast.

    Attributes:
        mode: "auto" is FSDP2 when several processes run and nothing otherwise; "fsdp" (FSDP2 fully_shard),
            "ddp" (replicated, all-reduce) or "none" force one.
        param_dtype: Dtype parameters are gathered in for compute under FSDP2 ("auto": bf16 on CUDA, fp32
            on the CPU). Gradient reduction and optimizer state stay fp32.
        activation_checkpointing: "none"; "full" recomputes every block in the backward pass; "selective"
            recomputes every other block (half the memory saving for a quarter of the extra compute).
        compile: torch.compile each transformer block (and the loss chunk) before sharding.
        tensor_parallel: Ranks that split each block's weights (Megatron-style, through DTensor); must divide
            the number of processes, which are then tensor_parallel-way model parallel and
            (processes / tensor_parallel)-way data parallel. Combines with FSDP2, not with DDP.
    """

    mode: Literal["auto", "fsdp", "ddp", "none"] = "auto"
    param_dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    tensor_parallel: int = 1


def init_distributed(device_type: str) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR...); (rank, world size).

    Backend: NCCL for CUDA, gloo for the CPU. A single process without torchrun stays un-initialised. A group
    made here is destroyed when the process exits.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    global _OWN_GROUP
    _OWN_GROUP = True
    faulthandler.enable()  # a crash or an abort in a worker prints the Python stack of every thread
    atexit.register(_destroy_process_group)  # for callers that end without `exit_distributed_worker`
    return dist.get_rank(), dist.get_world_size()


_OWN_GROUP = False  # whether init_distributed created this process's group (a torchrun worker)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_distributed_worker() -> None:
    """End a torchrun worker whose command has succeeded: destroy its process group, flush, and leave with
    status 0 without the interpreter's teardown. Does nothing in a process without a group of its own.

    NOTE: with gloo, a finished rank sometimes aborts during the C++ teardown at interpreter exit ("terminate
    called without an active exception", SIGABRT) even after destroy_process_group -- seen in CI (torch 2.13)
    and locally (torch 2.11), about once in 50 two-process runs, always on a rank that had finished all of its
    work (checkpoints and the model were complete) -- and torchrun then reports the whole run failed.
    `os._exit` skips that teardown; everything lmforge writes is closed by then.
    """
    if not (_OWN_GROUP and dist.is_initialized()):
        return
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class DataParallelRank:
    """Where this process reads data and with whom it sums losses: its rank among the dp ranks, their number,
    and their process group (None: the whole world, or no process group at all)."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None


def training_mesh(device: torch.device, tensor_parallel: int) -> DeviceMesh | None:
    """The (dp, tp) mesh over all processes (module docstring), or None for a single process."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if tensor_parallel < 1 or world_size % tensor_parallel:
        raise ValueError(f"parallel.tensor_parallel ({tensor_parallel}) must divide the number of processes "
                         f"({world_size})")
    if world_size == 1:
        return None
    # NOTE: an explicit mesh on the training device; fully_shard's default mesh takes CUDA whenever CUDA
    # exists, which breaks CPU (gloo) training on a machine with fewer GPUs than ranks.
    return init_device_mesh(device.type, (world_size // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))


def data_parallel_rank(mesh: DeviceMesh | None) -> DataParallelRank:
    if mesh is None:
        return DataParallelRank()
    dp = mesh["dp"]
    return DataParallelRank(dp.get_local_rank(), dp.size(), dp.get_group())


def parallelize(model: Transformer, cfg: ParallelConfig, device: torch.device, mesh: DeviceMesh | None = None
                ) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, compile and data parallelism to `model` in place,
    over `mesh` (`training_mesh`; None: one process); returns the module to call (the model itself, or its DDP
    wrapper)."""
    dp_size = mesh["dp"].size() if mesh is not None else 1
    mode = cfg.mode if cfg.mode != "auto" else ("fsdp" if dp_size > 1 else "none")
    if mode != "none" and mesh is None:
        raise ValueError(f"parallel.mode={mode!r} needs a process group: launch with torchrun")
    if cfg.tensor_parallel > 1:
        if mode == "ddp":
            raise ValueError("tensor parallelism combines with parallel.mode fsdp (or none), not ddp")
        apply_tensor_parallel(model, mesh["tp"])

    blocks: nn.ModuleList = model.layers
    for i, block in enumerate(blocks):
        if cfg.activation_checkpointing == "full" or (cfg.activation_checkpointing == "selective" and i % 2 == 0):
            # checkpoint_wrapper keeps parameter and state-dict names unchanged (no wrapper prefix), so
            # checkpoints stay loadable by the plain model.
            block = checkpoint_wrapper(block, preserve_rng_state=False)
            blocks[i] = block
        if cfg.compile:
            block.compile(fullgraph=model.config.moe is None)  # in place: names stay unchanged too

    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        param_dtype = _param_dtype(cfg.param_dtype, device)
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for i, block in enumerate(blocks):
            # NOTE: the last block is not resharded after forward: backward needs it first, so re-gathering
            # it at once would only add communication.
            fully_shard(block, mesh=mesh["dp"], mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
        fully_shard(model, mesh=mesh["dp"], mp_policy=mp)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=mesh["dp"].get_group())
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh) -> Transformer:
    """Megatron-style tensor parallelism of attention and dense feed-forwards over `tp_mesh`, in place.

    Per block: wq, wk, wv, w1, w3 are split by output rows (column-wise: each rank computes H / tp query heads,
    Hkv / tp key/value heads and f / tp hidden units), wo and w2 by input columns (row-wise: each rank's
    partial product is summed by one all-reduce). So each block costs two all-reduces of (B, T, d) and each
    rank holds about 1 / tp of the block weights. Embeddings, norms, the output projection and MoE layers stay
    replicated. Worked example, H = 4, Hkv = 2, tp = 2: rank 0 holds query heads 0, 1 and kv head 0, rank 1
    query heads 2, 3 and kv head 1, which is exactly GQA's grouping (query head h reads kv head h // 2).

    Caches for a tensor-parallel model hold Hkv / tp heads per rank (`lmforge.infer.cache.cache_config`
    reads the degree recorded here as `model.tp_degree`).

    NOTE: the all-reduces are NCCL's. In the profile of a compiled 7B decode step over 2 H200s they took 17 us
    a call, a quarter of the step (benchmarks/RESULTS.md). Inductor can lower them to symmetric-memory
    one-shot all-reduces (`torch._inductor.config._collective.auto_select` plus the deprecated
    `torch.distributed._symmetric_memory.enable_symm_mem_for_group`), but in torch 2.11 the op allocates its
    peer-pointer table through the caching allocator on first use, which is inside the CUDA-graph tree's warm-up
    pool, and the tree then refuses to record ("2 tensor(s) in the cudagraph pool not tracked as outputs").
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if getattr(model, "lora_config", None) is not None:  # the plans below name plain Linear modules
        raise ValueError("tensor parallelism does not split LoRA adapters: train LoRA with parallel.tensor_parallel "
                         "1 (FSDP2 shards adapters and base over the ranks)")
    tp = tp_mesh.size()
    cfg = model.config
    if any(block.attention.wqkv is not None for block in model.layers):
        raise ValueError("the model's projections are fused for decoding (lmforge.infer.fuse): split it first, or "
                         "call unfuse_projections(model)")
    if cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise ValueError(f"tensor-parallel degree {tp} must divide n_heads ({cfg.n_heads}) and n_kv_heads "
                         f"({cfg.n_kv_heads})")
    for block in model.layers:
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        if cfg.moe is None:
            if cfg.ffn_dim % tp:
                raise ValueError(f"tensor-parallel degree {tp} must divide ffn_dim ({cfg.ffn_dim})")
            plan |= {"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                     "feed_forward.w2": RowwiseParallel()}
        parallelize_module(block, tp_mesh, plan)
    model.tp_degree = tp
    return model


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their global 2-norm is at most `max_norm`; returns the norm before clipping.

    torch.nn.utils.clip_grad_norm_ stacks per-parameter norms, which fails when gradients are DTensors on
    different meshes, as under tensor parallelism + FSDP2: block weights live on the (dp, tp) mesh, the
    replicated embeddings and norms on dp alone. So: one norm per mesh (a DTensor norm reduced over its mesh;
    a plain tensor's is local, and the same on every rank that holds a replica), then the norm of those norms.
    """
    by_mesh: dict[object, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def full_model_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Every parameter as a full CPU tensor, whatever the sharding (a collective: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _param_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
