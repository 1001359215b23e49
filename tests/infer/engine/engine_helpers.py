"""Teacher forcing through the real engine: the engine computes, the test chooses every token."""

import torch

from lmforge.infer.engine import LLMEngine, RequestRefused
from lmforge.infer.sampling import SamplingParams


def random_seq(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def forced_logits(engine: LLMEngine, seqs, prompt_lens, before_step=None) -> list[torch.Tensor]:
    """Queue every seqs[b][:prompt_lens[b]] at once and run the engine to the end, forcing the rest of each
    sequence as its output. Returns, per sequence, the logits (T_b - P_b, V) of positions P_b - 1 .. T_b - 2
    (what the engine would sample from), and checks the block manager after every step."""
    ids = [
        engine.add_request(s[:p], SamplingParams(temperature=0, max_new_tokens=len(s) - p, ignore_eos=True))
        for s, p in zip(seqs, prompt_lens)
    ]
    target = dict(zip(ids, seqs))
    got: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
    step = 0
    while engine.has_unfinished():
        if before_step is not None:
            before_step(engine, step)
        out, sampled, logits = engine._forward()
        forced = [target[s.request_id][s.num_tokens] for s in sampled]
        for k, s in enumerate(sampled):
            got[s.request_id].append(logits[k])
        engine._advance(out, sampled, forced)
        engine.block_manager.check_invariants(engine.scheduler.running)
        step += 1
    assert engine.block_manager.num_used_blocks == 0, "blocks left behind by finished requests"
    return [torch.stack(got[i]) for i in ids]


def random_traffic(engine: LLMEngine, ops) -> list[str]:
    """Play ops (op, k) on the engine: "add" a request of k prompt tokens, "fork" one of k % 3 + 2 samples
    (`add_samples`), "step" (then check the block manager), "abort" request k of those added; then step to the
    end and check the block manager once more. Returns the ids of every request accepted."""
    ids: list[str] = []
    for op, k in ops:
        params = SamplingParams(max_new_tokens=k % 7 + 1)
        if op in ("add", "fork"):
            try:
                if op == "add":
                    ids.append(engine.add_request(random_seq(k, k), params))
                else:
                    ids += engine.add_samples(random_seq(k, k), params, n=k % 3 + 2)
            except RequestRefused:
                pass
        elif op == "step":
            engine.step()
            engine.block_manager.check_invariants(engine.scheduler.running)
        elif ids:
            engine.abort(ids[k % len(ids)])
    while engine.has_unfinished():
        engine.step()
    engine.block_manager.check_invariants([])
    return ids
