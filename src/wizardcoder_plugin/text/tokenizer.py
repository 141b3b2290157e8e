"""WizardCoder's tokenizer: StarCoder's byte-level BPE on the HF `tokenizers` (Rust) library.

StarCoder pre-tokenizes by isolating every digit, then applies GPT-2's byte-level split; the reference
implementation's GPT-2 regex skips the digit step and so produces different ids on any number.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from registry_spec.errors import InputError, WeightsUnavailableError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PAD_TOKEN = "[PAD]"
EOS_TOKEN = "<|endoftext|>"
_SPECIAL = re.compile(r"^<\|?[\w\-]+\|?>$")


class WizardCoderTokenizer:
    """encode/decode with StarCoder's exact ids; `[PAD]` appended after the vocabulary when absent."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        from tokenizers import AddedToken

        self._tok = tokenizer
        if self._tok.token_to_id(PAD_TOKEN) is None:
            self._tok.add_special_tokens([AddedToken(PAD_TOKEN, special=True, normalized=False)])
        if self._tok.token_to_id(EOS_TOKEN) is None:
            raise InputError(f"the vocabulary has no {EOS_TOKEN!r} token", "use a StarCoder-family vocabulary")
        self.pad_token_id: int = self._tok.token_to_id(PAD_TOKEN)
        self.eos_token_id: int = self._tok.token_to_id(EOS_TOKEN)
        # counted once: the library builds the whole vocabulary map to count it (ms a call), and the server checks
        # every request's ids against it
        self._vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> WizardCoderTokenizer:
        """Read `tokenizer.json` if present, else `vocab.json` + `merges.txt` (the reference's files)."""
        from tokenizers import Tokenizer

        d = Path(path)
        if d.is_file() and d.name == "tokenizer.json":
            d = d.parent
        if (d / "tokenizer.json").is_file():
            try:
                return cls(Tokenizer.from_file(str(d / "tokenizer.json")))
            except Exception as exc:  # noqa: BLE001 - the Rust error names the problem
                raise InputError(f"cannot read {d / 'tokenizer.json'}: {exc}", "is it an HF tokenizer.json?") from exc
        vocab, merges = d / "vocab.json", d / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise WeightsUnavailableError(
                "tokenizer files", [str(d / "tokenizer.json"), str(vocab), str(merges)],
                "pass --tokenizer DIR holding tokenizer.json, or vocab.json and merges.txt",
            )
        return cls.from_vocab_merges(vocab, merges)

    @classmethod
    def from_vocab_merges(cls, vocab_file: str | Path, merges_file: str | Path) -> WizardCoderTokenizer:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        try:
            vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
            bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read BPE files {vocab_file}, {merges_file}: {exc}",
                             "pass a GPT-2 style vocab.json and merges.txt") from exc
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens(vocab)])
        return cls(tok)

    # ------------------------------------------------------------------------------------------------- coding
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def pad_batch(self, texts: Sequence[str], max_length: int | None = None, side: str = "right",
                  truncation: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N, L] int32, attention_mask [N, L] int32); truncation keeps the last tokens (left truncation)."""
        rows = self.encode_batch(texts)
        if truncation and max_length:
            rows = [r[-max_length:] for r in rows]
        width = max_length or max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            if len(r) > width:
                raise InputError(f"text {i} has {len(r)} tokens, more than max_length {width}",
                                 "enable truncation or raise max_length")
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            ids[i, sl], mask[i, sl] = r, 1
        return ids, mask


def special_tokens(vocab: dict[str, int]) -> list[str]:
    """StarCoder-family vocabularies open with their special tokens (<|endoftext|>, <fim_prefix>, ...)."""
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    out = []
    for expected, (token, idx) in enumerate(by_id):
        if idx != expected or not _SPECIAL.match(token):
            break
        out.append(token)
    return out
