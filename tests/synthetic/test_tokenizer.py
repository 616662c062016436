"""The loc3r-tiny word-level tokenizer."""

import pytest
from tokenizers import Tokenizer

from loc3r.errors import Loc3rError
from loc3r.model.config import get_config
from loc3r.synthetic.dataset import SynthOptions, generate_scene, label_record
from loc3r.synthetic.tokenizer import SPECIAL_TOKENS, build_tokenizer, save_tokenizer, special_token_ids


def test_vocab_fits_loc3r_tiny_and_specials_are_first():
    tok = build_tokenizer()
    assert tok.get_vocab_size() <= get_config("loc3r-tiny").text.vocab_size
    ids = special_token_ids(tok)
    assert (ids.pad, ids.unk, ids.endoftext, ids.im_start, ids.im_end, ids.pos, ids.ori) == tuple(range(7))
    for t in SPECIAL_TOKENS:
        assert tok.encode(t, add_special_tokens=False).tokens == [t]


def test_save_round_trip(tmp_path):
    ids = save_tokenizer(tmp_path, extra_texts=["zebra crossing"])
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.token_to_id("<Pos>") == ids.pos and tok.token_to_id("<Ori>") == ids.ori
    assert tok.encode("zebra").tokens == ["\u2581zebra"]


def test_numbers_split_into_digits_and_decode_back():
    tok = build_tokenizer()
    enc = tok.encode("12.75", add_special_tokens=False)
    assert enc.tokens == ["\u2581", "1", "2", ".", "7", "5"]
    for s in ("0.5", "12.3", "7", "108.4"):
        assert tok.decode(tok.encode(s).ids) == s


def test_prompt_layout_keeps_pos_ori_single_tokens():
    tok = build_tokenizer()
    text = "<|im_start|>user\nI am standing next to the red chair, facing the blue table.<Pos><Ori> What is on my left?<|im_end|>\n"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.tokens.count("<Pos>") == 1 and enc.tokens.count("<Ori>") == 1
    assert tok.token_to_id("<unk>") not in enc.ids
    assert tok.encode("Unheard-of words", add_special_tokens=False).tokens[0] == "<unk>"
    # Chat-template words a prompt wraps around the video and question.
    chat = "<|im_start|>user\nvideo:\nsituation: x<Pos><Ori>\nquestion: y<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.encode(chat.replace(" x", "").replace(" y", ""), add_special_tokens=False)
    assert tok.token_to_id("<unk>") not in enc.ids


def test_every_generated_text_is_known():
    tok = build_tokenizer()
    unk = tok.token_to_id("<unk>")
    options = SynthOptions(frames=8, write_video=False)
    for i in range(3):
        sample = generate_scene("val", 1, i, options)
        for k, q in enumerate(sample.questions):
            rec = label_record(sample, k, q, "v.mp4", options)
            for text in (rec["situation"] or "", rec["question"], rec["answer"]):
                assert unk not in tok.encode(text).ids, text
            assert tok.decode(tok.encode(rec["answer"]).ids) == rec["answer"]


def test_vocab_limit_is_enforced():
    with pytest.raises(Loc3rError, match="more than the model's 20"):
        build_tokenizer(max_vocab=20)


def test_name_tokens_make_each_object_name_one_token_and_decode_back(tmp_path):
    from loc3r.synthetic.tokenizer import object_names

    ids = save_tokenizer(tmp_path, name_tokens=True)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # what a package ships and the runtime loads
    assert tok.get_vocab_size() <= get_config("loc3r-tiny").text.vocab_size
    assert tok.token_to_id("<Pos>") == ids.pos
    text = "I am standing next to the Pink Plant, facing the white chair.<Pos><Ori> How many chairs? the red chairs"
    enc = tok.encode(text, add_special_tokens=False)
    assert enc.tokens == ["\u2581i", "\u2581am", "\u2581standing", "\u2581next", "\u2581to", "\u2581the",
                          "\u2581pinkplant", ",", "\u2581facing", "\u2581the", "\u2581whitechair", ".", "<Pos>",
                          "<Ori>", "\u2581how", "\u2581many", "\u2581chairs", "?", "\u2581the", "\u2581red",
                          "\u2581chairs"]
    assert tok.decode(tok.encode("pink plant").ids) == "pink plant"
    for name in object_names():
        assert len(tok.encode(" " + name, add_special_tokens=False).ids) == 1, name
    assert build_tokenizer().encode("pink plant").tokens == ["\u2581pink", "\u2581plant"]  # off by default
