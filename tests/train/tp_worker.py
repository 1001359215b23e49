"""Run by test_tensor_parallel.py under torchrun (gloo): tensor-parallel logits equal the single-process model's.

Every rank builds the same seeded model, computes reference logits with it whole, then shards it with
`apply_tensor_parallel` and compares: a full forward, a chunked pre-fill into a KV cache holding the rank's
Hkv / tp heads, decode steps from that cache, and the serving engine's greedy tokens and log-probs over a
paged pool of the rank's heads. Exits non-zero (an AssertionError) on any mismatch.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from helpers import unit_scale_

from lmforge import ModelConfig, Transformer
from lmforge.infer.cache import cache_config, make_cache
from lmforge.parallel import apply_tensor_parallel

TOL = dict(rtol=1e-5, atol=1e-5)


def cached_logits(model, config, tokens, prompt_len):
    """Logits of a chunked pre-fill of the prompt, then of one decode step per remaining token."""
    B, T = tokens.shape
    cache = make_cache(config, B, T + 1, kind="contiguous")
    pos = torch.arange(prompt_len).expand(B, prompt_len)
    out = [model(tokens[:, :prompt_len], pos, cache=cache.prefill(pos))]
    for t in range(prompt_len, T):
        pos = torch.full((B, 1), t)
        out.append(model(tokens[:, t : t + 1], pos, cache=cache.decode(pos)))
    return torch.cat(out, dim=1)


def engine_scores(model, prompts):
    """Greedy outputs of the serving engine (paged KV pool of the rank's heads) with their log-probs."""
    from lmforge.infer.engine import LLMEngine
    from lmforge.infer.sampling import SamplingParams

    engine = LLMEngine(model, block_size=4, num_blocks=64, max_num_batched_tokens=16, max_num_seqs=8)
    params = SamplingParams(temperature=0, max_new_tokens=6, logprobs=True, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    out = {i: ([], []) for i in ids}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id][0].extend(o.new_token_ids)
            out[o.request_id][1].extend(o.new_logprobs)
    return [out[i] for i in ids]


def main(preset: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = ModelConfig.from_name(preset)
    model = unit_scale_(Transformer(config).eval(), norms=False)  # unit scale: 1e-5 is a relative tolerance
    tokens = torch.randint(0, config.vocab_size, (2, 21))
    prompts = [tokens[0, :9].tolist(), tokens[1, :4].tolist(), tokens[1, 3:17].tolist()]
    with torch.no_grad():
        full_ref = model(tokens)
        cached_ref = cached_logits(model, config, tokens, 13)
        engine_ref = engine_scores(model, prompts)
    tp = dist.get_world_size()
    apply_tensor_parallel(model, init_device_mesh("cpu", (tp,)))
    wq = model.layers[0].attention.wq.weight
    assert wq.to_local().shape[0] == config.n_heads * config.head_dim // tp  # really sharded
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), full_ref, **TOL)
        torch.testing.assert_close(cached_logits(model, cache_config(model), tokens, 13), cached_ref, **TOL)
        engine_tp = engine_scores(model, prompts)
        assert [ids for ids, _ in engine_tp] == [ids for ids, _ in engine_ref]
        for (_, a), (_, b) in zip(engine_tp, engine_ref):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **TOL)
    dist.destroy_process_group()
    # NOTE: as lmforge.parallel.exit_distributed_worker: gloo can abort a finished rank at interpreter exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
