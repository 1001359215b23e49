"""Alignment: what turns a pre-trained model into a chat model (SFT and the stages after it), and the world it is
measured on.

`lmforge.align.world` is the verifiable chat world (tasks, safety, instructions, an oracle judge and the data
sets built from them); `lmforge.align.eval_chat` answers a prompt set with a model and scores it.

The recipes, each one file with its own loop: `sft` (supervised fine-tuning), `rm` (`lmforge rm train`: Llama 2's
reward models) and `dpo`. What they read and share: `sft_data` and `packing` (dialogues); `preferences` (`lmforge
preferences collect`: pairs labelled by the world's oracle), `preference_data` (pair files, checked, mixed and
batched), `preference_losses` (the ranking and DPO losses), `pair_training` (what rm and dpo share),
`reward_model` (the regression head's scores), `reference_logps` (DPO's cached reference) and `rm_eval` (`rm eval`,
`rm score`).
"""
