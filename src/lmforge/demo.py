"""`make demo` (`python -m lmforge.demo`): the whole pre-training path on a laptop CPU in about four minutes.

    1. train a 4096-piece SentencePiece tokenizer on the embedded corpus (Python's own documentation)
    2. tokenize the corpus into token shards with a validation split
    3. pre-train a 1.8M-parameter Llama-style model (GQA, SwiGLU, RMSNorm, rotary) with Llama 2's recipe
       (AdamW 0.9/0.95, warm-up + cosine to 10%, clip 1.0), validation perplexity before, during and after
    4. sample a few continuations from the trained model
    5. plot the loss curve

Everything lands in runs/demo/; the same steps as CLI commands are printed at the end.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from lmforge.models.config import ModelConfig
from lmforge.train.config import DataConfig, RunConfig, TrainConfig
from lmforge.train.evaluate import perplexity
from lmforge.train.metrics import read_metrics, read_step_metrics
from lmforge.train.optim import OptimConfig

OUT = Path("runs/demo")
VOCAB = 4096
# NOTE: sized for about 2 minutes of training on 2 idle CPU cores (7.5k tokens/s at best): 1.8M parameters,
# 1M of them in the embedding and output tables. 4 x 192 wide (3.2M) reached a lower training loss in the
# same steps but ran 1.5x slower; with other work on the machine the demo must still end within 5 minutes.
MODEL = ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, vocab_size=VOCAB, max_seq_len=128)
TRAIN = TrainConfig(steps=400, global_batch_tokens=2048, micro_batch_size=16, seq_len=128, seed=0)
OPTIM = OptimConfig(lr=3e-3, warmup_steps=40)  # a small model takes larger steps than Llama 2's 3e-4
PROMPTS = ["The", "Return the", "This module provides", "If the"]


def main(out: Path = OUT) -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    print(f"lmforge demo: tokenizer, token shards, pre-training, sampling; everything goes to {out}/\n")

    from lmforge.data import prepare_data
    from lmforge.tokenizer.train import train_tokenizer

    print(f"[1/5] training a {VOCAB}-piece tokenizer on the embedded corpus (pydoc topics + stdlib docstrings)")
    tokenizer = train_tokenizer(None, out_dir=str(out / "tokenizer"), vocab_size=VOCAB, overwrite=True)

    print("[2/5] tokenizing the corpus into token shards (2% of the documents held out for validation)")
    manifest = prepare_data(None, tokenizer=tokenizer, out_dir=str(out / "data"), val_fraction=0.02, overwrite=True)
    splits = manifest["splits"]
    print(f"      train {splits['train']['tokens']:,} tokens, validation {splits['validation']['tokens']:,} tokens")

    from lmforge.train.pretrain import pretrain

    run_dir = out / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time
    tokens = TRAIN.steps * TRAIN.global_batch_tokens
    print(f"[3/5] pre-training {MODEL.n_layers} layers x {MODEL.dim} wide for {TRAIN.steps} steps of "
          f"{TRAIN.global_batch_tokens} tokens ({tokens / splits['train']['tokens']:.1f} epochs)")
    train_start = time.perf_counter()
    pretrain(model=MODEL, data=DataConfig(dir=str(out / "data")), train=TRAIN, optim=OPTIM,
             run=RunConfig(dir=str(run_dir), checkpoint_every=TRAIN.steps, eval_every=TRAIN.steps // 4,
                           eval_batches=1000))
    train_seconds = time.perf_counter() - train_start
    val = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r]
    steps = read_step_metrics(run_dir / "metrics.jsonl")

    print("[4/5] sampling from the trained model (temperature 0.8, top-k 40)")
    samples = sample(run_dir / "model")
    print("[5/5] plotting the loss curve")
    plot(steps, val, out / "loss.png")

    first, last = val[0], val[-1]
    print("\n==== what happened " + "=" * 60)
    print(f"validation perplexity before training: {perplexity(first['val/loss']):8.1f}  (loss {first['val/loss']:.3f};"
          f" a uniform guess over {VOCAB} pieces is {VOCAB})")
    print(f"validation perplexity after training:  {perplexity(last['val/loss']):8.1f}  (loss {last['val/loss']:.3f})")
    print(f"training loss: {steps[0]['loss']:.3f} at step 1 -> {steps[-1]['loss']:.3f} at step {steps[-1]['step']}; "
          f"{tokens:,} tokens in {train_seconds:.0f} s ({tokens / train_seconds:,.0f} tokens/s)")
    print("samples (the prompt in [brackets], line breaks shown as ⏎):")
    for prompt, text in zip(PROMPTS, samples):
        print(f"  [{prompt}]{text.replace(chr(10), ' ⏎ ')}")
    print("\nfiles:")
    for path, what in [
        (out / "tokenizer" / "tokenizer.model", "SentencePiece tokenizer"),
        (out / "data" / "manifest.json", "token shards and their manifest"),
        (run_dir / "config.yaml", "resolved training config (rerun: lmforge pretrain --config ...)"),
        (run_dir / "env.json", "library versions, git revision"),
        (run_dir / "metrics.jsonl", "one JSON record per step / validation / event"),
        (run_dir / "tensorboard", "tensorboard --logdir runs"),
        (run_dir / "checkpoints", "DCP training checkpoint (resume with --run.resume auto)"),
        (run_dir / "model", "the trained model: config.json, model.safetensors, tokenizer.model"),
        (out / "loss.png", "loss curve"),
    ]:
        print(f"  {str(path):40s} {what}")
    print("\nthe same as commands:")
    print(f"  lmforge tokenizer train --out_dir {out}/tokenizer --vocab_size {VOCAB} --overwrite true")
    print(f"  lmforge data prepare --tokenizer {out}/tokenizer --out_dir {out}/data --val_fraction 0.02 "
          "--overwrite true")
    print(f"  lmforge pretrain --config {run_dir}/config.yaml --run.dir runs/demo-again")
    print(f"  lmforge eval loss {run_dir}/model {out}/data --seq_len {TRAIN.seq_len}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")


def sample(model_dir: Path) -> list[str]:
    """One seeded continuation of each prompt, 40 tokens at most (prompt i samples with seed i)."""
    from lmforge.infer.generate import generate
    from lmforge.infer.sampling import SamplingParams
    from lmforge.models.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer

    model = load_model(model_dir).eval()
    tok = Tokenizer(model_dir / "tokenizer.model")
    params = [SamplingParams(temperature=0.8, top_k=40, max_new_tokens=40, seed=i) for i in range(len(PROMPTS))]
    results = generate(model, tok, [tok.encode(p) for p in PROMPTS], params)
    return [r.text for r in results]


def plot(steps: list[dict], val: list[dict], path: Path) -> None:
    """Training loss per step and validation loss, against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens_per_step = steps[0]["tokens_seen"] / steps[0]["step"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens_seen"] for r in steps], [r["loss"] for r in steps], lw=1, label="training loss")
    ax.plot([r["step"] * tokens_per_step for r in val], [r["val/loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(f"lmforge demo: {MODEL.n_layers} layers x {MODEL.dim}, vocabulary {VOCAB}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
