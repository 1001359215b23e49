"""`generate()` keeps its compiled / captured decode step across calls (`kept_decode_step`): the same cache
and step come back while the shapes stay (slots rounded up), reset; other shapes replace them; eager mode and
copies of the model keep nothing. The GPU test (test_gpu_decode.py) checks that a second call captures and
compiles nothing."""

import copy

import torch

from infer_helpers import tiny_model
from lmforge import Transformer
from lmforge.infer.decode_step import SLOT_QUANTUM, kept_decode_step


def _model(preset="tiny"):
    model = Transformer(tiny_model(preset).config).eval()
    model.load_state_dict(tiny_model(preset).state_dict())
    return model


def test_the_same_shapes_get_the_same_step_reset():
    model = _model()
    cache, step = kept_decode_step(model, 2, 40, "auto", "compile", torch.float32)
    assert cache.n_slots == SLOT_QUANTUM and step.cache is cache and step.mode == "compile"
    cache.slot_pos.fill_(3)  # a finished call's positions
    again, step2 = kept_decode_step(model, 2, SLOT_QUANTUM, "auto", "compile", torch.float32)  # same bucket
    assert again is cache and step2 is step and bool((again.slot_pos == -1).all())
    longer, step3 = kept_decode_step(model, 2, SLOT_QUANTUM + 1, "auto", "compile", torch.float32)
    assert step3 is not step and longer.n_slots == 2 * SLOT_QUANTUM
    wider, step4 = kept_decode_step(model, 3, 40, "auto", "compile", torch.float32)
    assert step4 is not step3 and wider.batch_size == 3
    assert kept_decode_step(model, 3, 40, "auto", "compile", torch.float64)[1] is not step4  # another dtype
    other = _model()  # kept per model
    assert kept_decode_step(other, 3, 40, "auto", "compile", torch.float32)[1].model is other


def test_rolling_caches_are_kept_at_the_window_and_eager_keeps_nothing():
    model = _model("tiny-swa")  # W = 8
    W = model.config.sliding_window
    cache, step = kept_decode_step(model, 1, 50, "auto", "compile", torch.float32)
    assert cache.n_slots == W and kept_decode_step(model, 1, 90, "auto", "compile", torch.float32)[1] is step
    eager = [kept_decode_step(model, 1, 6, "auto", "eager", torch.float32) for _ in range(2)]
    assert eager[0][1] is not eager[1][1] and eager[0][0].n_slots == 6  # exactly max_len, as before
    assert copy.deepcopy(model)._lmforge_kept_decode.step is None  # a copy starts without the kept step
