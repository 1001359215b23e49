"""`lmforge sft --lora.rank R`: golden losses through the CLI, only adapters in the checkpoints, an exact resume,
the base left bit for bit, and the merged export equal to the adapter model."""

import pytest
import torch

from lmforge.cli import main
from lmforge.lora import load_lora_model
from lmforge.models.checkpoint import load_model
from lmforge.train.checkpointing import latest_checkpoint
from test_sft import losses, sft_args

pytest.importorskip("peft")

LORA = ["--lora.rank", "4", "--lora.alpha", "8", "--optim.lr", "1e-2"]
# Pinned on the 2-core dev machine (torch 2.13 CPU, fp32, peft 0.21.2), the same in an uninterrupted run; step 1
# equals full fine-tuning's (B = 0: the adapters start as the identity).
GOLDEN = [6.854416847229004, 6.740758895874023, 6.373937129974365, 5.808295249938965, 5.450782299041748,
          5.342775821685791]


def test_lora_golden_losses_resume_and_export(tiny_folders, chat_file, tmp_path):
    run = tmp_path / "run"
    main(sft_args(tiny_folders["ours"], chat_file, run, tmp_path / "cache", *LORA, "--run.stop_at", "3"))
    # a checkpoint holds the adapters (and their optimizer state) only: no base weight is saved
    import json

    meta = json.loads((latest_checkpoint(run / "checkpoints") / "train_state.json").read_text())
    assert meta["counters"]["step"] == 3
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(latest_checkpoint(run / "checkpoints"))).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("modules.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]
    main(sft_args(tiny_folders["ours"], chat_file, run, tmp_path / "cache", *LORA, "--run.resume", "auto"))
    assert losses(run) == pytest.approx(GOLDEN, rel=1e-5)

    base = load_model(tiny_folders["ours"])
    merged = load_model(run / "model")
    adapted = load_lora_model(run / "adapter", tiny_folders["ours"])
    for name, p in base.state_dict().items():  # the adapters moved only the targeted projections
        assert torch.equal(p, merged.state_dict()[name]) == (name.split(".")[-2] not in
                                                             ("wq", "wk", "wv", "wo", "w1", "w2", "w3")), name
    tokens = torch.randint(3, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted(tokens), rtol=1e-5, atol=1e-5)
