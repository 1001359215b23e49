"""`lmforge dpo`: golden losses through the CLI and an exact resume, the reference's log-probs computed once and
cached (an interrupted pass continues, another reference refills), sequence log-probabilities through the chunked
cross-entropy equal to a direct computation."""

import numpy as np
import pytest
import torch

from helpers import one_torch_thread, unit_scale_  # noqa: F401  (one_torch_thread: autouse)
from lmforge import ModelConfig, Transformer
from lmforge.align.preference_data import pair_batch, preference_record, tokenize_pairs
from lmforge.align.reference_logps import fill_reference, sequence_logprobs
from lmforge.cli import main
from lmforge.tokenizer import Tokenizer
from lmforge.train.losses import token_logprobs
from lmforge.train.metrics import read_step_metrics
from pref_helpers import seeded_pairs
from test_rm import losses, pair_files  # noqa: F401  (pair_files: a fixture)

LN2 = float(np.log(2))


def dpo_args(model, files, run, *extra):
    """6 steps of 8 pairs (2 micro-batches of 4 pairs), lr 1e-3 after 2 warm-up steps, beta 0.5."""
    return ["dpo", str(model), "--data.sources", f"[{files['helpfulness']},{files['safety']}]", "--run.dir", str(run),
            "--train.batch_size", "8", "--train.micro_batch_size", "4", "--train.seq_len", "128", "--train.steps", "6",
            "--optim.lr", "1e-3", "--optim.warmup_steps", "2", "--loss.beta", "0.5", "--run.checkpoint_every", "2",
            "--run.progress", "false", "--train.device", "cpu", "--train.threads", "1", *extra]


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32), the same in an uninterrupted run; rtol 1e-5 as for the
# other golden losses. Step 1 is ln 2 exactly: the policy starts at the reference, so every implicit reward is 0.
GOLDEN = [0.6931467056274414, 0.16999822854995728, 0.08822843432426453, 0.038114260882139206, 0.3323115110397339,
          0.031114937737584114]


def test_golden_losses_an_exact_resume_and_the_reference_computed_once(tiny_folders, pair_files, tmp_path):
    run = tmp_path / "run"
    main(dpo_args(tiny_folders["ours"], pair_files, run, "--run.stop_at", "3"))
    cached = sorted((run / "reference").glob("*.npy"))
    assert [p.name for p in cached] == ["s0-train-00000.npy", "s1-train-00000.npy"]
    stamps = [p.stat().st_mtime_ns for p in cached]
    main(dpo_args(tiny_folders["ours"], pair_files, run, "--run.resume", "auto"))
    assert [p.stat().st_mtime_ns for p in cached] == stamps  # read back, not recomputed by the moved policy
    got = losses(run)
    assert got[0] == pytest.approx(LN2, abs=1e-6)
    # NOTE: abs 2e-6 beside rel 1e-5: float32 rounding scales with the step's first loss (ln 2), not with a late
    # loss near 0 (0.038 differs by 7.5e-7 between torch 2.11 and 2.13); a wrong step moves a loss by far more.
    assert got == pytest.approx(GOLDEN, rel=1e-5, abs=2e-6)
    record = read_step_metrics(run / "metrics.jsonl")
    # at step 1 every implicit reward is 0 up to rounding (the cache's batches pad differently from the step's)
    assert abs(record[0]["reward_margin"]) < 1e-5 and record[-1]["reward_accuracy"] > 0.5
    assert (run / "model" / "model.safetensors").is_file()


def test_sequence_log_probs_through_the_chunked_cross_entropy_equal_a_direct_sum(tokenizer_512):
    """log pi(answer | prompt) of padded rows from `sequence_logprobs` (chunks of 16 positions) against log_softmax
    of the full logits summed over the answer tokens of each row alone; gradients too. And `token_logprobs` itself."""
    torch.manual_seed(0)
    net = unit_scale_(Transformer(ModelConfig.from_name("tiny")))
    tok = Tokenizer(tokenizer_512)
    records = [preference_record(r, "x") for r in seeded_pairs(5, 3)]
    pairs = tokenize_pairs(records, tok, 128).splits["train"]
    b = pair_batch(pairs)
    got = sequence_logprobs(net, net, b.tokens, b.mask, loss_chunk=16)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    expected = []
    for p in pairs:
        for ids, mask in zip(p.ids, p.mask):
            x = torch.from_numpy(ids)
            logp = torch.log_softmax(net(x[None, :-1])[0], -1).gather(1, x[1:, None])[:, 0]
            expected.append((logp * torch.from_numpy(mask[1:])).sum())
    expected = torch.stack(expected)  # rows of b: the chosen answers, then the rejected ones
    order = [0, 2, 4, 1, 3, 5]
    torch.testing.assert_close(got, expected[order].detach(), rtol=1e-5, atol=1e-5)
    expected.sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5)
    assert b.mask.sum() < b.mask.numel() / 2  # prompts and padding were left out: the mask mattered
    h, w, t = torch.randn(2, 7, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 7))
    torch.testing.assert_close(token_logprobs(h, w, t, chunk=3),
                               torch.log_softmax(h @ w.T, -1).gather(2, t[..., None])[..., 0])


def test_the_reference_cache_continues_an_interrupted_pass_and_refills_for_another_reference(tokenizer_512, tmp_path,
                                                                                          monkeypatch):
    from lmforge.align import reference_logps

    monkeypatch.setattr(reference_logps, "CHUNK", 4)
    torch.manual_seed(0)
    net = unit_scale_(Transformer(ModelConfig.from_name("tiny"))).eval()
    tok = Tokenizer(tokenizer_512)
    sets = [tokenize_pairs([preference_record(r, "x") for r in seeded_pairs(6, 10)], tok, 128)]
    kw = dict(device=torch.device("cpu"), precision="fp32", batch_pairs=3, loss_chunk=64, progress=False)
    fill_reference(sets, tmp_path / "ref", net, "weights-1", **kw)
    first = [p.reference for p in sets[0].splits["train"]]
    assert len(list((tmp_path / "ref").glob("s0-train-*.npy"))) == 3  # 10 pairs in chunks of 4
    (tmp_path / "ref" / "s0-train-00002.npy").unlink()  # as if stopped before the last chunk
    poisoned = np.load(tmp_path / "ref" / "s0-train-00000.npy")
    np.save(tmp_path / "ref" / "s0-train-00000.npy", poisoned + 1.0)  # a finished chunk is read, not recomputed
    fill_reference(sets, tmp_path / "ref", net, "weights-1", **kw)
    again = [p.reference for p in sets[0].splits["train"]]
    assert again[:4] == [(c + 1.0, r + 1.0) for c, r in first[:4]] and again[8:] == first[8:]
    fill_reference(sets, tmp_path / "ref", net, "weights-2", **kw)  # another reference: everything recomputed
    assert np.allclose([p.reference for p in sets[0].splits["train"]], first, rtol=1e-6, atol=0)


def test_a_reference_model_from_another_folder(tiny_folders, pair_files, tmp_path):  # noqa: F811
    """--ref_model loads the reference from its folder for the pass: the same weights as a Hugging Face folder give
    the same first step (ln 2); other weights give another one."""
    main(dpo_args(tiny_folders["ours"], pair_files, tmp_path / "same", "--train.steps", "1", "--ref_model",
                  str(tiny_folders["hf"])))
    assert losses(tmp_path / "same") == pytest.approx(GOLDEN[:1], rel=1e-5)
    from lmforge.models.checkpoint import save_model

    torch.manual_seed(1)
    save_model(Transformer(ModelConfig.from_name("tiny")), tmp_path / "other", tokenizer_path=tokenizer_of(tiny_folders))
    main(dpo_args(tiny_folders["ours"], pair_files, tmp_path / "run", "--train.steps", "1", "--ref_model",
                  str(tmp_path / "other")))
    assert abs(losses(tmp_path / "run")[0] - LN2) > 1e-2


def tokenizer_of(folders):
    return folders["ours"] / "tokenizer.model"
