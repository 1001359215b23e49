"""lm-evaluation-harness's `local-completions` against the server: its figures equal those computed in-process.

lm-eval sends each (context, continuation) as token ids with max_tokens 1, echo and logprobs 1, sums the
continuation's `token_logprobs` and calls it greedy when each equals the max of its `top_logprobs`. The same
numbers are computed here from `LLMEngine.score` on the same ids (lm-eval's own pair encoding: trailing spaces
of the context go to the continuation, the pair is encoded whole and split after the context's tokens).
"""

import math
from pathlib import Path

import pytest

from lmforge.tokenizer import export_hf_tokenizer
from serve_helpers import MODEL

TASKS = Path(__file__).parent / "lm_eval_task"


def _pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def _in_process(served, tok, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = _pair(tok, context, continuation)
    (s,) = served.engine.score([ctx + cont], top_k=1)
    part = slice(len(ctx) - 1, len(ctx) + len(cont) - 1)  # entries predicting the continuation's tokens
    return float(s.logprobs[part].sum()), bool((s.logprobs[part] == s.top_logprobs[part, 0]).all())


@pytest.mark.slow
def test_lm_eval_local_completions_equals_in_process(server, served, tokenizer_path, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    hf = tmp_path / "hf-tokenizer"
    export_hf_tokenizer(tokenizer_path, hf)
    monkeypatch.chdir(TASKS)  # the task files name their data relative to this folder
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = (f"model={MODEL},base_url={server}/v1/completions,tokenizer={hf},tokenizer_backend=huggingface,"
            "tokenized_requests=True,max_length=256,num_concurrent=1,max_retries=1")
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # NOTE: indexing lm-eval's own takes ~50 s
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["lmforge_mc", "lmforge_ll"],
                                  batch_size=4, task_manager=tasks, log_samples=True, random_seed=0,
                                  numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    tok = served.tokenizer
    # multiple choice: accuracy = argmax over the choices' log-likelihoods is the answer
    samples = out["samples"]["lmforge_mc"]
    correct = []
    for sample in samples:
        lls = [_in_process(served, tok, *a)[0] for a in sample["arguments"]]
        theirs = [r[0][0] for r in sample["resps"]]
        assert theirs == pytest.approx(lls, abs=1e-4)
        correct.append(max(range(len(lls)), key=lls.__getitem__) == sample["target"])
    assert len(samples) == 8
    assert out["results"]["lmforge_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    # log-likelihood: perplexity = exp(-mean ll) and greedy match
    samples = out["samples"]["lmforge_ll"]
    ours = [_in_process(served, tok, *s["arguments"][0]) for s in samples]
    for sample, (ll, greedy) in zip(samples, ours):
        assert sample["resps"][0][0][0] == pytest.approx(ll, abs=1e-4) and sample["resps"][0][0][1] == greedy
    res = out["results"]["lmforge_ll"]
    assert res["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in ours) / len(ours)), rel=1e-5)
    assert res["acc,none"] == pytest.approx(sum(g for _, g in ours) / len(ours))
