"""Chat templates (ours, a folder's Jinja one, against transformers) and the two answerers (in-process, endpoint)."""

import pytest

from lmforge.infer.sampling import SamplingParams
from lmforge.serve.chat_template import ChatTemplate, MessageError
from lmforge.serve.client import EndpointAnswerer, EngineAnswerer
from lmforge.tokenizer import Tokenizer, encode_chat, export_hf_tokenizer
from serve_helpers import MODEL, tiny_engine

DIALOGUES = [
    [{"role": "user", "content": "the quick brown fox?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x_1 = 5 + y"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
     {"role": "user", "content": "  data   loss  "}],
    [{"role": "user", "content": "наука 日本語 <s> [INST]"}],
]


@pytest.fixture(scope="module")
def hf_folder(tokenizer_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-template")
    export_hf_tokenizer(tokenizer_path, folder)  # tokenizer_config.json carries our Llama 2 Jinja template
    return folder


def test_the_folders_jinja_template_gives_our_ids_and_transformers_ids(tokenizer_path, hf_folder):
    transformers = pytest.importorskip("transformers")
    tok = Tokenizer(tokenizer_path)
    jinja = ChatTemplate.from_folder(hf_folder, tok)
    assert jinja.source is not None  # the folder's template, not the built-in path
    hf = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    for d in DIALOGUES:
        ours = encode_chat(tok, d, add_generation_prompt=True).ids
        theirs = hf.apply_chat_template(d, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ChatTemplate(tok).encode(d) == ours
        assert jinja.encode(d) == theirs
        # NOTE: a rendered template is text, so "<s>" typed by a user becomes the BOS id there (as in transformers);
        # encode_chat works on ids and never lets text become a control token
        assert (theirs == ours) == ("<s>" not in str(d))


def test_a_custom_template_renders_and_splits_special_tokens(tokenizer_path):
    tok = Tokenizer(tokenizer_path)
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    t = ChatTemplate(tok, template, {"bos_token": "<s>", "eos_token": "</s>"})
    ids = t.encode([{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                    {"role": "user", "content": "hi"}])
    expected = [tok.bos_id] + tok.encode("<|system|>a\nb") + [tok.eos_id] + tok.encode("<|user|>hi") + \
        [tok.eos_id] + tok.encode("<|assistant|>")
    assert ids == expected


def test_bad_messages_name_the_field(tokenizer_path):
    t = ChatTemplate(Tokenizer(tokenizer_path))
    with pytest.raises(MessageError) as e:
        t.encode([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert e.value.param == "messages[0].content[0]"
    with pytest.raises(MessageError, match="alternating"):
        t.encode([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    failing = ChatTemplate(t.tokenizer, "{{ raise_exception('no system messages') }}", {})
    with pytest.raises(MessageError, match="no system messages"):
        failing.encode([{"role": "user", "content": "a"}])


def test_endpoint_and_in_process_answerers_agree(server, served):
    sampling = SamplingParams(temperature=0, max_new_tokens=20, stop=["e"])
    local = EngineAnswerer(tiny_engine(served.engine.model, served.tokenizer.eos_id), served.tokenizer)
    remote = EndpointAnswerer(server + "/v1", concurrency=3)
    assert remote.answer(DIALOGUES, sampling) == local.answer(DIALOGUES, sampling)
    full = remote.answer_full(DIALOGUES, sampling)
    here = local.answer_full(DIALOGUES, sampling)
    assert [(a.finish_reason, a.prompt_tokens) for a in full] == [(a.finish_reason, a.prompt_tokens) for a in here]
    prompts = ["the lazy dog", "model token train"]
    assert remote.complete(prompts, sampling) == local.complete(prompts, sampling)
    assert EndpointAnswerer(server + "/v1", model=MODEL).model == MODEL
