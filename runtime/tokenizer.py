"""The prompt tokenizer: HF ``tokenizers`` plus the manifest's chat template.

A prompt is ``prefix`` tokens, then the frame blocks (embeddings, not
tokens), then ``suffix`` tokens. The suffix holds the question and, only when
a situation is given, the situation followed by ``<Pos><Ori>`` (the hidden
states at those two positions feed the localization heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from loc3r.errors import Loc3rError
from loc3r.runtime.package import ChatTemplate, Package, SpecialTokens

POS_TOKEN = "<Pos>"
ORI_TOKEN = "<Ori>"


@dataclass(frozen=True)
class EncodedSuffix:
    """Token ids after the video, and where ``<Pos>``/``<Ori>`` sit among them."""

    ids: np.ndarray  # (T,) int64
    pos_index: Optional[int]  # index into ids, None without a situation
    ori_index: Optional[int]


class PromptTokenizer:
    """Encodes prompts and decodes answers for one model package."""

    def __init__(self, tokenizer_path: Union[str, Path], template: ChatTemplate, special: SpecialTokens):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise Loc3rError(f"cannot read tokenizer {tokenizer_path}: {exc}") from None
        self.template = template
        self.special = special
        for text, want in ((POS_TOKEN, special.pos), (ORI_TOKEN, special.ori)):
            got = self._tok.token_to_id(text)
            if got != want:
                raise Loc3rError(
                    f"tokenizer {Path(tokenizer_path).name} disagrees with the manifest: "
                    f"{text} is id {got}, the manifest says {want}"
                )
        self._prefix = self._encode(template.prefix)

    @classmethod
    def from_package(cls, package: Package) -> "PromptTokenizer":
        m = package.manifest
        return cls(package.tokenizer_path, m.chat_template, m.special_tokens)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int64)

    def encode_prefix(self) -> np.ndarray:
        """The tokens before the first frame, ``(P,)`` int64 (a copy)."""
        return self._prefix.copy()

    def encode_suffix(self, question: str, situation: Optional[str] = None) -> EncodedSuffix:
        """The tokens after the last frame: situation (+ ``<Pos><Ori>``), question, answer cue."""
        question = (question or "").strip()
        if not question:
            raise Loc3rError("the question is empty")
        if situation is not None:
            situation = situation.strip()
            if not situation:
                raise Loc3rError("the situation is empty (leave out --situation to ask without one)")
        for text in (question, situation or ""):
            if POS_TOKEN in text or ORI_TOKEN in text:
                raise Loc3rError(f"the question and situation must not contain {POS_TOKEN} or {ORI_TOKEN}")
        ids = self._encode(self.template.render_suffix(question, situation))  # (T,)
        pos = np.flatnonzero(ids == self.special.pos)
        ori = np.flatnonzero(ids == self.special.ori)
        want = 1 if situation is not None else 0
        if len(pos) != want or len(ori) != want:
            raise Loc3rError(
                f"the chat template produced {len(pos)} {POS_TOKEN} and {len(ori)} {ORI_TOKEN} tokens, "
                f"expected {want} of each"
            )
        return EncodedSuffix(
            ids=ids,
            pos_index=int(pos[0]) if want else None,
            ori_index=int(ori[0]) if want else None,
        )

    def is_eos(self, token_id: int) -> bool:
        return int(token_id) == self.special.eos

    def decode(self, ids: Iterable[int]) -> str:
        """Answer text: stops at the first EOS, skips special tokens, strips spaces."""
        out = []
        for i in ids:
            if self.is_eos(i):
                break
            out.append(int(i))
        return self._tok.decode(out, skip_special_tokens=True).strip()

    def token_count(self, text: str) -> int:
        return len(self._encode(text))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)
