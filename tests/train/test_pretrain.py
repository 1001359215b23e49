"""`lmforge pretrain` through its real CLI: pinned losses, accumulation-invariant normalisation, the NaN stop,
MoE auxiliary losses, and `lmforge eval`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.cli import main
from lmforge.data import PackedLoader
from lmforge.models.checkpoint import load_model
from lmforge.train.metrics import read_metrics, read_step_metrics
from lmforge.train.runinfo import git_revision


def pretrain_args(data_dir, run_dir, *extra):
    """5 steps of the tiny model, 2048 tokens a step as 4 micro-batches of 4 x 128, checkpoints every 2 steps."""
    return ["pretrain", "--preset", "tiny", "--data.dir", str(data_dir), "--run.dir", str(run_dir), "--train.device", "cpu",
            "--train.steps", "5", "--train.global_batch_tokens", "2048", "--train.micro_batch_size", "4",
            "--train.seq_len", "128", "--optim.lr", "1e-2", "--optim.warmup_steps", "2",
            "--run.checkpoint_every", "2", "--run.eval_every", "5", "--run.eval_batches", "2",
            "--run.progress", "false", *extra]


def losses(run_dir):
    return [r["loss"] for r in read_step_metrics(run_dir / "metrics.jsonl")]


def initial_model():
    """The weights `pretrain --preset tiny` starts from: built on meta, seeded with train.seed, init_weights."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_name("tiny"))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32), after checking that repeated runs agree bitwise,
# in this process and in a subprocess, with 1 and 2 threads. NOTE: rtol 1e-5 leaves room for another CPU's
# matmul kernels summing in another order (~1e-6 relative after 5 steps) but not for any change of data
# order, normalisation, schedule or initialisation.
GOLDEN = [6.7318191528, 5.0484943390, 2.9923212528, 2.1150968075, 1.8119096756]


def test_golden_losses(token_data, tmp_path):
    main(pretrain_args(token_data, tmp_path / "run"))
    assert losses(tmp_path / "run") == pytest.approx(GOLDEN, rel=1e-5)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "val/loss" in r] == [0, 5]
    lrs = [5e-3, 1e-2, 1e-2, 1e-3 + 9e-3 * 0.75, 1e-3 + 9e-3 * 0.25]  # W = 2, S = 5
    assert [r["lr"] for r in records if "lr" in r] == pytest.approx(lrs)
    # checkpoints every 2 steps and at the end, the last two kept
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert files >= {"config.yaml", "env.json", "metrics.jsonl", "tensorboard", "model", "checkpoints"}
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["libraries"]["torch"] == torch.__version__ and env["git"] == git_revision()  # None outside git
    # the resolved config runs the same run again (2 steps suffice: the first two updates do not depend on
    # the total number of steps, as warm-up lasts 2)
    main(["pretrain", "--config", str(tmp_path / "run" / "config.yaml"), "--run.dir", str(tmp_path / "again"),
          "--train.steps", "2"])
    assert losses(tmp_path / "again") == losses(tmp_path / "run")[:2]


def test_first_loss_is_the_plain_cross_entropy_of_the_first_batch(token_data, tmp_path):
    """The logged loss of step 1 recomputed by hand: the same initial weights on the loader's first 16
    sequences, plain (unchunked) cross-entropy averaged over every target token."""
    main(pretrain_args(token_data, tmp_path / "run", "--train.steps", "1"))
    model = initial_model()
    batch = next(PackedLoader(token_data, seq_len=128, batch_size=16, seed=0))
    with torch.no_grad():
        expected = F.cross_entropy(model(batch.inputs).flatten(0, 1), batch.targets.flatten())
    assert losses(tmp_path / "run")[0] == pytest.approx(expected.item(), rel=1e-6)


def test_accumulation_does_not_change_the_step(masked_token_data, tmp_path):
    """One step over 16 sequences equals 4 accumulated micro-batches of 4, although the micro-batches hold very
    different numbers of target tokens (uneven loss masks)."""
    common = ["--train.steps", "3", "--train.global_batch_tokens", "2048", "--run.eval_every", "0"]
    main(pretrain_args(masked_token_data, tmp_path / "one", *common, "--train.micro_batch_size", "16"))
    main(pretrain_args(masked_token_data, tmp_path / "four", *common, "--train.micro_batch_size", "4"))

    # the micro-batches of the first step really are uneven, and averaging their means would be wrong
    batch = next(PackedLoader(masked_token_data, seq_len=128, batch_size=16, seed=0))
    counts = batch.loss_mask.view(4, 4, 128).sum(dim=(1, 2))
    assert counts.max() > 2 * counts.min() > 0, counts
    model = initial_model()
    with torch.no_grad():
        logits = model(batch.inputs).flatten(0, 1)
        ce = F.cross_entropy(logits, batch.targets.flatten(), reduction="none").view(4, 4 * 128)
    mask = batch.loss_mask.view(4, 4 * 128)
    true_mean = (ce * mask).sum() / mask.sum()
    mean_of_means = ((ce * mask).sum(1) / mask.sum(1)).mean()
    assert abs(mean_of_means - true_mean) > 1e-3

    one, four = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "four"))
    assert one[0]["loss"] == pytest.approx(true_mean.item(), rel=1e-6)
    # NOTE: fp32, the same per-token terms summed in another grouping (4 partial sums, then their sum): a few
    # ulp, measured up to 1.5e-7 relative on the loss. The parameters after 3 AdamW steps inherit that through
    # m / sqrt(v), where entries with |grad| near eps amplify it (measured 5e-7): atol 5e-6 still sits 2000x
    # below one step's change of ~lr = 1e-2 per weight, so a wrongly normalised micro-batch cannot pass.
    for a, b in zip(one, four):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    m1, m4 = load_model(tmp_path / "one" / "model"), load_model(tmp_path / "four" / "model")
    for (name, p), q in zip(m1.state_dict().items(), m4.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=5e-6, msg=name)


def test_planted_nan_stops_before_the_update_and_the_last_checkpoint_resumes(token_data, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(pretrain_args(token_data, run, "--run.checkpoint_every", "1", "--train.debug_nan_at_step", "3"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: non-finite loss (nan) or gradient norm (nan) at step 3; the update was "
                          f"not applied. Last good checkpoint: {run / 'checkpoints' / 'step_000002'}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert not (run / "model").exists()
    records = read_metrics(run / "metrics.jsonl")
    assert records[-1]["event"] == "non_finite" and max(r["step"] for r in records if "loss" in r) == 2
    # the checkpoint on disk is the last good step: resuming from it (without the planted NaN) gives the
    # uninterrupted run's losses
    main(pretrain_args(token_data, run, "--run.checkpoint_every", "1", "--run.resume", "auto"))
    assert losses(run) == pytest.approx(GOLDEN, rel=1e-5)


def test_moe_auxiliary_losses_are_logged_and_trained(token_data, tmp_path):
    moe = {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.02, "z_loss_coef": 1e-3}
    shapes = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 96, "vocab_size": 512,
              "max_seq_len": 256}
    for name, coefs in (("aux", moe), ("no_aux", {**moe, "aux_loss_coef": 0.0, "z_loss_coef": 0.0})):
        (tmp_path / f"{name}.yaml").write_text(json.dumps({"model": {**shapes, "moe": coefs}}))
        args = pretrain_args(token_data, tmp_path / name, "--train.steps", "2", "--run.eval_every", "0")
        args.remove("--preset"), args.remove("tiny")
        main([*args, "--config", str(tmp_path / f"{name}.yaml"), "--data.document_masking", "true"])
    aux, no_aux = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("aux", "no_aux"))
    # load balance is alpha * E * sum f_e P_e >= alpha (equality when uniform); z-loss is positive
    assert aux[0]["aux/load_balance"] >= 0.02 * 0.999 and aux[0]["aux/z_loss"] > 0
    assert no_aux[0]["aux/load_balance"] == 0 and no_aux[0]["aux/z_loss"] == 0
    assert aux[0]["loss"] == no_aux[0]["loss"]  # same weights and data; the logged loss is the LM loss alone
    assert aux[0]["grad_norm"] != no_aux[0]["grad_norm"]  # the router losses reach the gradient


def test_eval_verb_reports_the_perplexity_of_every_validation_sample(token_data, tmp_path, capsys):
    from lmforge.train.evaluate import evaluate

    main(pretrain_args(token_data, tmp_path / "run", "--train.steps", "2", "--run.eval_every", "0"))
    main(["eval", "loss", str(tmp_path / "run" / "model"), token_data, "--seq_len", "128", "--batch_size", "5", "--device", "cpu"])
    assert "perplexity" in capsys.readouterr().out
    result = evaluate(str(tmp_path / "run" / "model"), token_data, seq_len=128, batch_size=5, device="cpu")
    model = load_model(tmp_path / "run" / "model")
    loader = PackedLoader(token_data, split="validation", seq_len=128, batch_size=1, shuffle=False)
    with torch.no_grad():
        per_sample = [F.cross_entropy(model(b.inputs)[0], b.targets[0], reduction="sum").item()
                      for b in (next(loader) for _ in range(loader.num_samples))]
    expected = sum(per_sample) / (128 * loader.num_samples)
    assert result["tokens"] == 128 * loader.num_samples and loader.num_samples % 5 != 0  # a short last batch
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_init_from_our_folder_or_hugging_face_starts_from_those_weights(token_data, tmp_path):
    from lmforge.models.checkpoint import save_model
    from lmforge.export import convert

    torch.manual_seed(123)
    start = Transformer(ModelConfig.from_name("tiny-swa"))
    save_model(start, tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    batch = next(PackedLoader(token_data, seq_len=128, batch_size=16, seed=0))
    with torch.no_grad():
        expected = F.cross_entropy(start(batch.inputs).flatten(0, 1), batch.targets.flatten()).item()
    for source in ("ours", "hf"):
        args = pretrain_args(token_data, tmp_path / f"run-{source}", "--train.steps", "1", "--run.eval_every", "0")
        args[args.index("--preset") : args.index("--preset") + 2] = ["--init_from", str(tmp_path / source)]
        main(args)
        assert losses(tmp_path / f"run-{source}")[0] == pytest.approx(expected, rel=1e-6), source
        assert load_model(tmp_path / f"run-{source}" / "model").config.sliding_window == 8


def test_loss_spikes_are_logged_as_the_detector_sees_them(token_data, tmp_path):
    """The loop feeds every loss to the spike detector and logs exactly the steps it flags: a run with a
    learning rate high enough to make the loss jump, and a hair-trigger detector (window 2, 0 sigmas)."""
    from lmforge.train.metrics import SpikeDetector

    run = tmp_path / "run"
    main(pretrain_args(token_data, run, "--train.steps", "8", "--optim.lr", "0.3", "--optim.warmup_steps", "1",
                       "--train.spike_window", "2", "--train.spike_sigmas", "0"))
    records = read_metrics(run / "metrics.jsonl")
    detector = SpikeDetector(2, 0.0)
    steps = read_step_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in steps] == list(range(1, 9))
    expected = [r["step"] for r in steps if detector.update(r["loss"])[0]]
    logged = [r["step"] for r in records if r.get("event") == "loss_spike"]
    assert expected, "the run was meant to have a loss jump"
    assert logged == expected


@pytest.mark.parametrize("window", [("2", "1"), ("3", "4")], ids=["inside-the-run", "past-the-end"])
def test_profiled_steps_write_a_trace_and_a_table_and_train_the_same(token_data, tmp_path, window):
    """--run.profile_at/--run.profile_steps: the trace and the top-ops table are written (also when the run ends
    inside the window), and profiling does not change the losses (the first 3 match the golden run's: warm-up
    lasts 2 steps, so updates 1 and 2 do not depend on train.steps)."""
    run = tmp_path / "run"
    main(pretrain_args(token_data, run, "--train.steps", "3", "--run.checkpoint_every", "0", "--run.eval_every", "0",
                       "--run.profile_at", window[0], "--run.profile_steps", window[1]))
    assert losses(run) == pytest.approx(GOLDEN[:3], rel=1e-5)
    table = (run / "profile" / "top_ops.txt").read_text()
    assert table.startswith(f"steps {window[0]}-{int(window[0]) + int(window[1]) - 1}") and "aten::mm" in table
    names = {e.get("name") for e in json.loads((run / "profile" / "trace.json").read_text())["traceEvents"]}
    assert "aten::mm" in names and "Optimizer.step#AdamW.step" in names


def test_a_profile_window_before_step_1_is_refused(token_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(pretrain_args(token_data, tmp_path / "run", "--run.profile_at", "0"))
    assert "run.profile_at and run.profile_steps must be >= 1" in capsys.readouterr().err
