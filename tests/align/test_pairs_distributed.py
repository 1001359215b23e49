"""`dpo` on 2 FSDP2 ranks (torchrun, gloo on the CPU) gives the single-process golden losses for the same global
batch: each rank reads its own pairs of the step (the loader's global cursor, which `rm train` shares), the loss is
the mean over the global batch's pairs, the output projection is used outside the sharded forward, and the
reference pass is collective (every rank takes part in every forward). `rm train` passes the same test (pass
verb "rm"); only DPO runs in CI, as each torchrun costs ~40 s on 2 cores.

Tolerance: rtol 1e-5, as for the other data-parallel tests (only where sums happen differs)."""

import os
import subprocess
import sys

import pytest

import test_dpo
import test_rm
from test_rm import losses, pair_files  # noqa: F401  (pair_files: a fixture)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("verb", ["dpo"])
def test_two_fsdp_ranks_give_the_single_process_losses(verb, tiny_folders, pair_files, tmp_path):  # noqa: F811
    module = test_rm if verb == "rm" else test_dpo
    args = (module.rm_args if verb == "rm" else module.dpo_args)(tiny_folders["ours"], pair_files, tmp_path / "run")
    # 8 pairs a step: 2 micro-batches of 4 in one process, one of 4 on each of 2 ranks
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge.cli",
           *args, "--parallel.mode", "fsdp"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(tmp_path / "run") == pytest.approx(module.GOLDEN, rel=1e-5, abs=2e-6)  # test_dpo.py: NOTE
