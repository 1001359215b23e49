from helpers import one_torch_thread  # noqa: F401  (autouse: the engine decodes tiny models on one thread)
