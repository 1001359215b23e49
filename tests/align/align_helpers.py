"""Helpers of the alignment tests (importable as `align_helpers`)."""

# A world small enough to build in a fraction of a second.
SMALL = dict(entities=6, corpus_files=4, corpus_arithmetic=200, corpus_lists=100, corpus_counting=100, corpus_lore=2,
             corpus_stories=20, sft_tasks=120, sft_multiturn=10, sft_instructions=20, sft_refusals=12,
             sft_refusals_preprompt=20, sft_lookalikes=20, sft_lookalikes_preprompt=5, sft_creative=5, eval_tasks=5,
             eval_unsafe=10, eval_lookalikes=10, eval_instructions=10, eval_multiturn=4, multiturn_turns=3,
             eval_factual=6, eval_creative=5, rlhf_prompts=40)
