"""Tokenizer ids equal transformers' on StarCoder's pre-tokenization; decode(encode(x)) == x."""

from __future__ import annotations

import json
import re

import pytest
from conftest import BUNDLED_TOKENIZER, STARCODER2

from registry_spec.errors import WeightsUnavailableError
from wizardcoder_plugin.text.tokenizer import WizardCoderTokenizer, special_tokens

TOK_DIR = STARCODER2 if STARCODER2.is_dir() else BUNDLED_TOKENIZER
CORPUS = [
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "#include <stdio.h>\nint main() { printf(\"%d\\n\", 12345); return 0; }",
    "fn main() { let v: Vec<u64> = (0..100).map(|x| x * 2).collect(); }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY 2 DESC LIMIT 10;",
    "const add = (a, b) => a + b; // 3.14159 and 2e-10 and 0xFF",
    "写一个Python函数，计算两个数的和。\n请用中文回答。",
    "emoji 😀🚀👩‍💻 and accents: café naïve façade",
    "\t\ttabs\tand    spaces   \n\n\n   trailing   ",
    "numbers 1234567890 9.99 -42 1e10 2024-11-25",
    "<|endoftext|>special tokens<fim_prefix>inside<fim_suffix>text<fim_middle>",
    "Below is an instruction that describes a task.\n\n### Instruction:\nSort a list.\n\n### Response:",
    "    if __name__ == \"__main__\":\n        main()\r\n",
    "",
]


@pytest.fixture(scope="module")
def ours() -> WizardCoderTokenizer:
    return WizardCoderTokenizer.from_pretrained(TOK_DIR)


@pytest.fixture(scope="module")
def reference():
    """transformers' pure-Python GPT-2 BPE (independent of the Rust library), after StarCoder's digit split."""
    from transformers import GPT2Tokenizer

    class StarCoderSlow(GPT2Tokenizer):
        def _tokenize(self, text):
            tokens = []
            for piece in re.split(r"(\d)", text):
                if piece:
                    tokens.extend(super()._tokenize(piece))
            return tokens

    vocab = json.loads((TOK_DIR / "vocab.json").read_text())
    return StarCoderSlow(str(TOK_DIR / "vocab.json"), str(TOK_DIR / "merges.txt"),
                         additional_special_tokens=special_tokens(vocab), unk_token="<|endoftext|>",
                         bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def test_ids_equal_transformers(ours, reference):
    for text in CORPUS:
        assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_round_trip_and_special_ids(ours):
    for text in CORPUS:
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.eos_token_id == 0 and ours.pad_token_id == 49152 and ours.vocab_size == 49153
    assert all(ours.encode(d) == [ours.encode(d)[0]] for d in "0123456789")
    assert len(ours.encode("12345")) == 5  # every digit is its own token (the reference's regex merges them)
    assert ours.decode(ours.encode("a<|endoftext|>b"), skip_special_tokens=True) == "ab"


def test_tokenizer_json_path_equals_fast_reference(ours, tmp_path):
    from transformers import PreTrainedTokenizerFast

    ours.backend.save(str(tmp_path / "tokenizer.json"))
    again = WizardCoderTokenizer.from_pretrained(tmp_path)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    for text in CORPUS:
        assert again.encode(text) == ours.encode(text) == fast.encode(text, add_special_tokens=False)


def test_batch_padding_and_truncation(ours):
    ids, mask = ours.pad_batch(["a b c d", "a"], side="right")
    assert ids.shape == mask.shape and mask[1].sum() == 1 and ids[1, -1] == ours.pad_token_id
    ids, mask = ours.pad_batch(["one two three four five"], max_length=2, truncation=True)
    assert ids.shape == (1, 2) and ours.decode(ids[0]) == ours.decode(ours.encode("one two three four five")[-2:])


def test_missing_files_list_every_path(tmp_path):
    with pytest.raises(WeightsUnavailableError) as exc:
        WizardCoderTokenizer.from_pretrained(tmp_path)
    assert "merges.txt" in str(exc.value) and "tokenizer.json" in str(exc.value)


def test_a_model_with_no_checkpoint_given_says_to_pass_its_weights(tmp_path):
    """wizardcoder-15b with neither --weights nor a default folder: the tokenizer is missing because the checkpoint
    is, and the hint says so (exit 2, before anything loads)."""
    from conftest import zoo

    r = zoo("predict", "wizardcoder-15b", "--prompt", "x", env={"HOME": str(tmp_path), "ZOO_WEIGHTS_DIR": ""})
    assert r.returncode == 2 and "pass --weights with the wizardcoder-15b checkpoint folder" in r.stderr, r.stderr
