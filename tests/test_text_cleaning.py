"""The tokenizer gives OpenAI CLIP's ids on real-world text: ``clean_text`` (ftfy, HTML entities, white
space, lower case) before the BPE, checked against a table transcribed from OpenAI's tokenizer
(tests/data/openai_tokenizer_cases.json; its ``about`` says how it was made)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mulclip_fast.data import LONG_CONTEXT, SHORT_CONTEXT, CLIPTokenizer
from mulclip_fast.data.text import clean_text

CASES = json.loads((Path(__file__).parent / "data" / "openai_tokenizer_cases.json").read_text(encoding="utf-8"))
EOT, SOT = 49407, 49406


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer()


def test_the_table_covers_truncation_at_both_contexts():
    rows = [(len(case["ids"]) + 2, case) for case in CASES["cases"]]
    for context in (SHORT_CONTEXT, LONG_CONTEXT):
        assert any(n == context for n, _ in rows), f"no case fills exactly {context} tokens"
        truncated = [case for n, case in rows if n > context]
        assert truncated and all(case[f"row_{context}"][-1] == EOT for case in truncated)


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda case: ascii(case["text"])[:40])
def test_ids_are_openai_ids(tokenizer, case):
    assert tokenizer.count_tokens(case["text"]) == len(case["ids"]) + 2
    for context in (SHORT_CONTEXT, LONG_CONTEXT):
        expected = case[f"row_{context}"]
        row = tokenizer.tokenize([case["text"]], context)[0].tolist()
        assert row == expected + [0] * (context - len(expected)), f"context {context}"


def test_curly_quotes_are_the_straight_quote_token(tokenizer):
    # Without the clean-up the BPE sees three-byte quote characters: 728, 506, 5808, 728, 507.
    assert tokenizer.tokenize(["“quotes”"], SHORT_CONTEXT)[0, :5].tolist() == [SOT, 257, 5808, 257, EOT]
    assert tokenizer.tokenize(["“quotes”"], SHORT_CONTEXT).equal(tokenizer.tokenize(['"quotes"'], SHORT_CONTEXT))


def test_clean_text_steps():
    assert clean_text("  Fish &amp;amp; Chips\u00a0\t\n“Café”  ") == 'fish & chips "café"'
    assert clean_text("doesnâ€™t") == "doesn't"  # mojibake repaired
    with pytest.raises(ValueError, match="text must be a string, got int"):
        clean_text(3)
    tokenizer = CLIPTokenizer()
    with pytest.raises(ValueError, match="text must be a string, got NoneType"):
        tokenizer.tokenize(["a cat", None])
