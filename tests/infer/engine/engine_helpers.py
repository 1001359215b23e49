"""Driving the real engine in tests: teacher forcing (the test chooses every token), random traffic, a mixed
workload whose outputs two engines must agree on."""

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


def forced_fork_logits(engine, prompt, continuations, max_steps=1000):
    """add_samples(prompt, n=K), then force continuations[i] as choice i's output: per choice, the logits it
    would sample from at each of its positions (len(continuations[i]), V). Checks the invariants every step."""
    ids = engine.add_samples(prompt, SamplingParams(temperature=0, max_new_tokens=max(map(len, continuations)),
                                                    ignore_eos=True), n=len(continuations))
    target = {i: prompt + list(c) for i, c in zip(ids, continuations)}
    got = {i: [] for i in ids}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        out, sampled, logits = engine._forward()
        for k, s in enumerate(sampled):
            got[s.request_id].append(logits[k])
        engine._advance(out, sampled, [target[s.request_id][s.num_tokens] for s in sampled])
        engine.block_manager.check_invariants(engine.scheduler.running)
        for i in ids:  # a choice whose continuation is shorter stops there
            seq = engine.seqs.get(i)
            if seq is not None and seq.num_tokens == len(target[i]):
                engine.abort(i)
    assert engine.block_manager.num_used_blocks == 0, "blocks left behind"
    return [torch.stack(got[i][: len(c)]) for i, c in zip(ids, continuations)]


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


def mixed_workload(vocab: int = 512):
    """(arrival step, prompt, params, n) of mixed requests: greedy and seeded, log-probs, penalties, forks."""
    reqs = []
    for i in range(9):
        seeded = i % 3 != 0
        params = SamplingParams(
            temperature=1.0 if seeded else 0.0, top_k=50 if i % 2 else 0, seed=100 + i if seeded else None,
            max_new_tokens=6 + 3 * i, logprobs=True, top_logprobs=2 if i == 4 else 0,
            # strong penalties on greedy requests (3; 6 is forked): a count that misses the token in flight
            # changes their next token
            repetition_penalty=4.0 if i == 3 else 1.0, presence_penalty=2.0 if i == 6 else 0.0,
            frequency_penalty=0.5 if i == 7 else 0.0)
        reqs.append((i // 2, random_seq(3 + 4 * i, 30 + i, vocab), params, 3 if i in (2, 6) else 1))
    return reqs


def serve(engine, reqs, abort=None):
    """Run the workload; request ids are added at their arrival step; `abort` = (request, n): abort it once
    it has delivered n tokens. Returns {request id: (tokens, log-probs, top log-probs, finish reason)}."""
    got, pending, t = {}, list(reqs), 0
    ids_of = {}
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= t:
            _, prompt, params, n = pending.pop(0)
            name = f"r{len(ids_of)}"
            if n > 1:
                ids_of[name] = engine.add_samples(prompt, params, n, name)
            else:
                ids_of[name] = [engine.add_request(prompt, params, name)]
            for rid in ids_of[name]:
                got[rid] = ([], [], [], None)
        for out in engine.step():
            tokens, logprobs, tops, _ = got[out.request_id]
            tokens += out.new_token_ids
            logprobs += out.new_logprobs or []
            tops += out.new_top_logprobs or []
            got[out.request_id] = (tokens, logprobs, tops, out.finish_reason)
            assert out.num_output_tokens == len(tokens)
            if abort and out.request_id == abort[0] and len(tokens) == abort[1]:
                assert engine.abort(out.request_id)
                got[out.request_id] = (tokens, logprobs, tops, "abort")
        engine.block_manager.check_invariants(engine.scheduler.running)
        t += 1
    assert engine.counters.kv_blocks_used == 0 and not engine._inflight
    return got


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        (ta, la, pa, ra), (tb, lb, pb, rb) = a[rid], b[rid]
        assert (ta, ra) == (tb, rb), rid
        assert [[t for t, _ in x] for x in pa] == [[t for t, _ in x] for x in pb]
        # log-probs: a step's batch differs with overlap (a sequence that stops computes one more token), and
        # batches of other shapes round differently in the last bits
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-5)
