import numpy as np
import pytest

from loc3r.errors import Loc3rError
from loc3r.runtime.package import load_package
from loc3r.runtime.tokenizer import PromptTokenizer


@pytest.fixture
def tok(tiny_package):
    return PromptTokenizer.from_package(load_package(tiny_package))


def ids_of(tok, words):
    return [tok._tok.token_to_id(w) for w in words]


def test_prefix(tok):
    assert tok.encode_prefix().tolist() == ids_of(tok, ["<im_start>", "user", ":"])
    assert tok.encode_prefix().dtype == np.int64


def test_suffix_without_situation_has_no_pos_ori(tok):
    enc = tok.encode_suffix("what is on my left ?")
    assert enc.ids.tolist() == ids_of(
        tok, ["what", "is", "on", "my", "left", "?", "<im_end>", "<im_start>", "assistant", ":"]
    )
    assert enc.pos_index is None and enc.ori_index is None


def test_suffix_with_situation(tok):
    enc = tok.encode_suffix("what is on my left ?", situation="i am sitting on the bed .")
    words = ["i", "am", "sitting", "on", "the", "bed", ".", "<Pos>", "<Ori>", "what", "is", "on",
             "my", "left", "?", "<im_end>", "<im_start>", "assistant", ":"]
    assert enc.ids.tolist() == ids_of(tok, words)
    assert (enc.pos_index, enc.ori_index) == (7, 8)
    assert enc.ids[enc.pos_index] == tok.special.pos


def test_decode_stops_at_eos(tok):
    ids = ids_of(tok, ["a", "chair", "<eos>", "table"])
    assert tok.decode(ids) == "a chair"
    assert tok.is_eos(tok.special.eos)


@pytest.mark.parametrize(
    "question, situation, message",
    [
        ("", None, "the question is empty"),
        ("   ", None, "the question is empty"),
        ("what", "  ", "the situation is empty (leave out --situation to ask without one)"),
        ("what <Pos>", None, "the question and situation must not contain <Pos> or <Ori>"),
    ],
)
def test_bad_text(tok, question, situation, message):
    with pytest.raises(Loc3rError) as e:
        tok.encode_suffix(question, situation)
    assert str(e.value) == message


def test_manifest_disagreement(tiny_package):
    import dataclasses

    pkg = load_package(tiny_package)
    special = dataclasses.replace(pkg.manifest.special_tokens, pos=0)
    with pytest.raises(Loc3rError) as e:
        PromptTokenizer(pkg.tokenizer_path, pkg.manifest.chat_template, special)
    assert str(e.value) == "tokenizer tokenizer.json disagrees with the manifest: <Pos> is id 3, the manifest says 0"
