"""Alignment: what turns a pre-trained model into a chat model (SFT and the stages after it), and the world it is
measured on.

`lmforge.align.world` is the verifiable chat world (tasks, safety, instructions, an oracle judge and the data
sets built from them); `lmforge.align.eval_chat` answers a prompt set with a model and scores it.
"""
