"""Llama 2 chat format: ids equal Meta's reference encoding and `apply_chat_template` of our export; the loss
mask covers exactly the answers and their closing </s>; bad dialogues are clear errors."""

import pytest
import sentencepiece as spm

from lmforge.tokenizer import ChatFormatError, encode_chat

SYS = {"role": "system", "content": "  You are terse.\nAnswer in one line.  "}
U1 = {"role": "user", "content": " what is 2+2?  "}
A1 = {"role": "assistant", "content": "  4 \n"}
U2 = {"role": "user", "content": "and in\ttabs,   spaces and 日本語 🙂?"}
A2 = {"role": "assistant", "content": "x = 12\n    y = 3  # 🦙"}
U3 = {"role": "user", "content": "[INST] tags inside content [/INST] <<SYS>>"}

DIALOGUES = {
    "single-turn prompt": [U1],
    "system + prompt": [SYS, U1],
    "one exchange": [U1, A1],
    "system + one exchange": [SYS, U1, A1],
    "multi-turn prompt": [U1, A1, U2],
    "system + multi-turn prompt": [SYS, U1, A1, U2, A2, U3],
    "multi-turn complete": [U1, A1, U2, A2],
    "system + multi-turn complete": [SYS, U1, A1, U2, A2],
}


def meta_reference(sp, dialog):
    """Meta's `chat_completion` encoding (llama/generation.py), extended to dialogues ending with an answer."""
    B_INST, E_INST, B_SYS, E_SYS = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": dialog[1]["role"], "content": merged}] + dialog[2:]
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} "
        tokens += [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]
    if dialog[-1]["role"] == "user":
        tokens += [sp.bos_id()] + sp.encode(f"{B_INST} {(dialog[-1]['content']).strip()} {E_INST}")
    return tokens


@pytest.mark.parametrize("name", DIALOGUES)
def test_ids_equal_meta_reference_and_apply_chat_template(name, tok, tok_path, hf_tok):
    messages = DIALOGUES[name]
    open_ = messages[-1]["role"] == "user"
    ours = encode_chat(tok, messages, add_generation_prompt=open_)
    assert ours.ids == meta_reference(spm.SentencePieceProcessor(model_file=tok_path), messages)
    hf = hf_tok.apply_chat_template(messages, add_generation_prompt=open_, tokenize=True, return_dict=False)
    assert hf == ours.ids
    # Without add_generation_prompt a trailing user message is still rendered open (chat.py NOTE), both ways.
    assert hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False) == encode_chat(tok, messages).ids


def test_special_token_text_in_content_differs_as_documented(tok, hf_tok):
    """Hugging Face parses "<s>" typed in a message as id 1 (hf_export.py NOTE); Meta's code and ours don't."""
    messages = [{"role": "user", "content": "say <s> please"}]
    ours = encode_chat(tok, messages, add_generation_prompt=True).ids
    hf = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.count(tok.bos_id) == 1 and hf.count(tok.bos_id) == 2


@pytest.mark.parametrize("name", DIALOGUES)
def test_loss_mask_covers_exactly_answers_and_their_eos(name, tok):
    messages = DIALOGUES[name]
    enc = encode_chat(tok, messages)
    assert len(enc.ids) == len(enc.loss_mask)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    # Split the ids at each <s>: one exchange per segment.
    starts = [i for i, t in enumerate(enc.ids) if t == tok.bos_id] + [len(enc.ids)]
    assert len(starts) - 1 == len(answers) + (messages[-1]["role"] == "user")
    for k, (a, b) in enumerate(zip(starts, starts[1:])):
        ids, mask = enc.ids[a:b], enc.loss_mask[a:b]
        learned = [t for t, m in zip(ids, mask) if m]
        if k == len(answers):  # the open prompt: nothing learned
            assert not any(mask)
            continue
        first = mask.index(True)
        assert all(mask[first:]) and not any(mask[:first])  # one contiguous run to the end of the exchange
        assert learned[-1] == tok.eos_id and ids[-1] == tok.eos_id
        assert tok.decode(learned) == answers[k].strip() + " "  # decode drops the leading dummy-prefix space
        assert tok.id_to_piece(learned[0]).startswith("▁")  # ...which the first answer token carries
        assert tok.decode(ids[:first]).endswith("[/INST]")


def test_learn_last_marks_only_the_final_answer(tok):
    messages = [SYS, U1, A1, U2, A2]
    every, last = encode_chat(tok, messages), encode_chat(tok, messages, learn="last")
    assert every.ids == last.ids
    second = [i for i, t in enumerate(every.ids) if t == tok.bos_id][1]
    assert last.loss_mask[:second] == [False] * second
    assert last.loss_mask[second:] == every.loss_mask[second:] and any(last.loss_mask)
    prompt_open = encode_chat(tok, [U1, A1, U2], learn="last")  # the open prompt is never learned
    assert prompt_open.loss_mask == encode_chat(tok, [U1, A1, U2]).loss_mask


@pytest.mark.parametrize(
    "messages, add_generation_prompt, message",
    [
        ([], False, "non-empty list"),
        ([SYS], False, "no user message"),
        ([A1], False, "message 0 is 'assistant', expected 'user'"),
        ([U1, U2], False, "message 1 is 'user', expected 'assistant'"),
        ([U1, A1, A2], False, "message 2 is 'assistant', expected 'user'"),
        ([U1, SYS], False, "message 1 is 'system', expected 'assistant': a dialogue is an optional system message"),
        ([{"role": "tool", "content": "x"}], False, "roles are system, user, assistant"),
        ([{"role": "user", "content": None}], False, "content must be a str"),
        ([{"role": "user"}], False, "must be a dict with 'role' and 'content'"),
        ([U1, A1], True, "add_generation_prompt=True needs a dialogue that ends with a user message"),
    ],
)
def test_bad_dialogues_are_clear_errors(tok, hf_tok, messages, add_generation_prompt, message):
    with pytest.raises(ChatFormatError, match=message):
        encode_chat(tok, messages, add_generation_prompt=add_generation_prompt)
    if messages and all("content" in m and isinstance(m["content"], str) for m in messages):
        with pytest.raises(Exception):  # the Jinja template refuses the same dialogues
            hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
