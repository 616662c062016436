"""A word-level tokenizer for the loc3r-tiny demo model.

The vocabulary is every word of the question/situation templates (all
colours, categories, plurals), the chat-template words, the ten digits and
punctuation, plus special tokens. Text is lower-cased and split into words
(Metaspace: a word carries its leading space as ``▁``), punctuation and
single digits, so any number tokenizes and ``decode`` gives back ``1.5``
rather than ``1 . 5``. Unknown words become ``<unk>``.

With ``name_tokens``, every object name (colour and category, "pink plant")
is one word: a normalizer joins the two ("pinkplant") before the split and
the decoder parts them again. loc3r-tiny's from-scratch LLM then looks an
object up with one query token instead of combining two (the conjunction
its lookup could not learn in the CPU budget; README, "Grounding attention").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from loc3r.errors import Loc3rError
from loc3r.synthetic.questions import PLURALS, TEMPLATE_TEXTS
from loc3r.synthetic.scene import CATEGORIES, OBJECT_COLOURS

SPECIAL_TOKENS = ("<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<Pos>", "<Ori>")
DEFAULT_MAX_VOCAB = 512  # loc3r-tiny's vocab_size

# Chat-template and helper text that prompts may contain besides the questions.
CHAT_TEXTS = (
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "Answer the question using a single word or number.",
    "video: the video shows a room. situation: question: answer:",
    "what where which who how is are the a an of in on to my me i you it this that there yes no",
    "left right front back behind closer closest farther nearest metres meters square m",
)
_METASPACE = "\u2581"


@dataclass(frozen=True)
class SpecialTokenIds:
    pad: int
    unk: int
    endoftext: int
    im_start: int
    im_end: int
    pos: int
    ori: int


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
        pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])


def object_names() -> list[str]:
    """Every object name the generator can produce ("pink plant")."""
    return [f"{c} {k}" for c in OBJECT_COLOURS for k in CATEGORIES]


def _joined(name: str) -> str:
    return name.replace(" ", "")


def template_corpus() -> list[str]:
    """Every text the templates can produce, with all object names filled in."""
    names = object_names()
    texts = list(TEMPLATE_TEXTS) + list(CHAT_TEXTS) + names + list(PLURALS.values())
    return [t.replace("{a}", "x").replace("{b}", "x").replace("{c}", "x").replace("{d}", "x")
            .replace("{plural}", "x") for t in texts]


def build_tokenizer(extra_texts: Sequence[str] = (), max_vocab: int = DEFAULT_MAX_VOCAB, name_tokens: bool = False):
    """A ``tokenizers.Tokenizer`` over the template vocabulary (plus ``extra_texts``); with ``name_tokens``,
    one token per object name."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    pre = _pre_tokenizer()
    words: set[str] = {_METASPACE, _METASPACE + "\n"} | {str(d) for d in range(10)} | set(".,?!:;'\"()-/%")
    texts = list(template_corpus()) + list(extra_texts)
    if name_tokens:
        texts += [_joined(n) for n in object_names()]
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text.lower()):
            words.add(piece)
    words -= {"x", _METASPACE + "x"}  # template slots
    words -= {t.lower() for t in SPECIAL_TOKENS}
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    if len(vocab) > max_vocab:
        raise Loc3rError(f"tokenizer vocabulary has {len(vocab)} entries, more than the model's {max_vocab}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    metaspace = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    if name_tokens:
        joins = [normalizers.Replace(Regex(rf"\b{n}\b"), _joined(n)) for n in object_names()]
        tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), *joins])
        tok.decoder = decoders.Sequence([*(decoders.Replace(_joined(n), n) for n in object_names()), metaspace])
    else:
        tok.normalizer = normalizers.Lowercase()
        tok.decoder = metaspace
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def special_token_ids(tok) -> SpecialTokenIds:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    return SpecialTokenIds(*ids)


def save_tokenizer(path: Path, extra_texts: Iterable[str] = (), max_vocab: int = DEFAULT_MAX_VOCAB,
                   name_tokens: bool = False) -> SpecialTokenIds:
    """Build the tokenizer, write ``tokenizer.json`` to ``path`` and return the special token ids."""
    tok = build_tokenizer(tuple(extra_texts), max_vocab, name_tokens)
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return special_token_ids(tok)
