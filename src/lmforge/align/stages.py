"""What the stages after SFT share: a model folder as an answerer, and data a stage generates and then
fine-tunes on through `sft` (Ghost Attention, safety context distillation).

Those two verbs generate dialogues with a model, write them to a data folder, and fine-tune through `lmforge
sft` on them (`learn: last`: only each dialogue's last answer is learned), mixed with any other sources the
user gives (e.g. the SFT set as replay). The fine-tuning's options are sft's own, grouped under --sft
(`FineTuneConfig`: --sft.train.steps, --sft.optim.lr, --sft.data.sources, --sft.run.dir, ...). Two folders,
each under the output rule:

    DATA (default: RUN-data)   <name>.jsonl (the training dialogues), summary.json, the verb's other files
    RUN  (--sft.run.dir)       the sft run folder: config.yaml, metrics.jsonl, summary.json, model/ ...

With --sft.run.resume the data folder of an earlier attempt is reused as it is (it is written atomically, so
it is complete or absent) and the fine-tuning continues from its checkpoint without generating again.
Without it, both folders are checked before any generation starts: an earlier output is replaced only with
--sft.run.overwrite true, and a folder lmforge did not write is refused.

NOTE: the run folder is sft's own (its config.yaml reruns `lmforge sft` on the generated file), because the
fine-tuning is exactly sft's; the generation settings are in DATA/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.align.sft import SFT_OPTIM, SFTTrainConfig
from lmforge.align.sft_data import SFTDataConfig, SFTSource
from lmforge.lora import LoraConfig
from lmforge.parallel import ParallelConfig
from lmforge.train.config import RunConfig
from lmforge.train.optim import OptimConfig

RUN_FLAG = "--sft.run.resume auto to continue it, or --sft.run.overwrite true"


def load_answerer(model: str | Path, device: str | None = None, dtype: str | None = None, batch_size: int = 64,
                  tokenizer: str | Path | None = None):
    """(model, tokenizer, answer) of a model folder: `answer(dialogues, sampling) -> texts` runs `LLMEngine`
    in this process (eval chat's in-process answerer, `batch_size` sequences decoded together)."""
    from lmforge.align.eval_chat import engine_answerer
    from lmforge.infer.cli import _load  # the loader of `lmforge generate`: model, tokenizer, vocabulary check

    net, tok = _load(Path(model), Path(tokenizer) if tokenizer else None, device, dtype)
    return net, tok, engine_answerer(net, tok, batch_size)


@dataclass
class FineTuneConfig:
    """The fine-tuning through `lmforge sft`: its option groups, with its defaults (Llama 2's SFT recipe).

    Attributes:
        data: Other dialogue sources mixed with the generated ones (e.g. --sft.data.sources
            [runs/world/sft.jsonl], the SFT set as replay), the tokenised cache, the validation split.
        train: Rows per step, row length, epochs or steps, precision, device (the device also generates).
        optim: AdamW and the schedule (defaults: peak 2e-5, cosine to 10%, weight decay 0.1, no warm-up).
        run: The run folder (default runs/<verb>), resume, overwrite, checkpoints, reporting.
        parallel: FSDP2 / DDP under torchrun, activation checkpointing, torch.compile.
        lora: Low-rank adapters (rank 0: off).
    """

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    train: SFTTrainConfig = field(default_factory=SFTTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: dataclasses.replace(SFT_OPTIM))
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class StageFolders:
    """The run settings with their folder resolved, the data folder, and whether it is reused (resume)."""

    run: RunConfig
    data_dir: Path
    reuse: bool


def stage_folders(verb: str, run: RunConfig, data_dir: str | Path | None) -> StageFolders:
    """Resolve and check the folders of a generate-then-fine-tune verb (module docstring), before any work."""
    from lmforge.io import claim_output_dir, is_lmforge_output

    run_dir = Path(run.dir or f"runs/{verb}")
    data_dir = Path(data_dir) if data_dir is not None else run_dir.with_name(f"{run_dir.name}-data")
    if data_dir.resolve() == run_dir.resolve():
        raise ValueError(f"data_dir and run.dir are the same folder ({run_dir}); the data goes beside the run")
    reuse = run.resume is not None and is_lmforge_output(data_dir) and (data_dir / "summary.json").is_file()
    if not reuse:
        if run.resume is None:
            claim_output_dir(run_dir, run.overwrite, RUN_FLAG)
        claim_output_dir(data_dir, run.overwrite, "--sft.run.overwrite true")
    return StageFolders(dataclasses.replace(run, dir=str(run_dir)), data_dir, reuse)


def write_stage_data(data_dir: Path, written_by: str, files: dict[str, list[dict]], summary: dict,
                     overwrite: bool) -> None:
    """DATA/<name> for each jsonl file of records, and DATA/summary.json, written whole (the output rule)."""
    from lmforge.io import output_dir

    with output_dir(data_dir, written_by, overwrite) as tmp:
        for name, records in files.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def fine_tune(init_from: str, dialogues: Path, weight: float, cfg: FineTuneConfig, run: RunConfig) -> Path:
    """`sft` from `init_from` on `dialogues` (learn: last, mixing weight `weight`) plus cfg.data.sources, with
    the run settings `run` (their folder resolved by `stage_folders`). Returns the run folder."""
    from lmforge.align.sft import sft

    sources = [SFTSource(str(dialogues), weight=weight, learn="last"), *cfg.data.sources]
    return sft(init_from, dataclasses.replace(cfg.data, sources=sources), cfg.train, cfg.optim, run, cfg.parallel,
               cfg.lora)


__all__ = ["FineTuneConfig", "StageFolders", "fine_tune", "load_answerer", "stage_folders", "write_stage_data"]
