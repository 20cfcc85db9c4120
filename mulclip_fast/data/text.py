"""CLIP tokenisation and caption splitting (docs/method.md, "Features").

Long captions use Long-CLIP's 248-token context; summaries and subcaptions use OpenAI's 77. Truncation
always keeps the end-of-text token, because the text tower pools at EOT. Text is cleaned as OpenAI's
tokenizer cleans it before BPE (``clean_text``), so that ids are those the pretrained towers saw.
"""

from __future__ import annotations

import html
import re

import ftfy
import torch

LONG_CONTEXT = 248
SHORT_CONTEXT = 77

# A sentence ends at . ! or ? (closing quotes or brackets may follow) before white space, or at a CJK
# full stop (。！？, written without a space). The summary is the first sentence and SAP's subcaptions are
# the sentences, so a split after "Dr." made the summary "Dr." and "e.g. a chair" two subcaptions that
# describe nothing; a period after these (a name or an example follows them) is therefore not a sentence end:
_NEVER_SENTENCE_END = {"mr", "mrs", "ms", "dr", "prof", "st", "mt", "e.g", "i.e", "cf", "vs"}
# ... and after these, or any word with a period inside ("p.m.", "U.S."), only when a capital letter follows:
# "cups, plates, etc. The table" ends a sentence, "etc. are on the table" does not. So does a sentence end
# inside quotes or brackets ('reads "OPEN." Below it' against '"Sale!" in red').
_SENTENCE_END_IF_CAPITAL_FOLLOWS = {"etc", "approx", "jr", "sr", "inc", "ltd", "co", "no"}
_BOUNDARY = re.compile(r"(?P<end>[.!?]+)(?P<closing>[\"'”’)\]]*)\s+|[。！？]+\s*")


def _ends_sentence(text: str, boundary: re.Match) -> bool:
    if boundary.group("end") is None:  # a CJK full stop
        return True
    following = text[boundary.end() :].lstrip("\"'“‘([")
    capital_follows = following[:1].isupper()
    if boundary.group("closing"):
        return capital_follows
    if boundary.group("end") != ".":
        return True
    before = text[max(0, boundary.start() - 64) : boundary.start()].split()  # the last word (a window: linear time)
    word = before[-1].lstrip("\"'“‘([").lower() if before else ""
    if word in _NEVER_SENTENCE_END:
        return False
    if word in _SENTENCE_END_IF_CAPITAL_FOLLOWS or "." in word:
        return capital_follows
    return True


def split_sentences(text: str) -> list[str]:
    """The sentences of a caption, stripped, empty ones dropped (rules above ``_ends_sentence``)."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    text = text.strip()
    sentences, start = [], 0
    for boundary in _BOUNDARY.finditer(text):
        if _ends_sentence(text, boundary):
            sentences.append(text[start : boundary.end()].strip())
            start = boundary.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def summary_of(text: str) -> str:
    """The summary caption: the first sentence (the whole text when it has no sentence end)."""
    sentences = split_sentences(text)
    return sentences[0] if sentences else ""


def subcaptions_of(text: str, max_subcaptions: int = 8) -> list[str]:
    """The caption's sentences, at most ``max_subcaptions`` of them (the first ones)."""
    if max_subcaptions < 1:
        raise ValueError(f"max_subcaptions must be >= 1, got {max_subcaptions}")
    return split_sentences(text)[:max_subcaptions]


_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """OpenAI CLIP's text clean-up before BPE (``basic_clean``, ``whitespace_clean``, lower case):
    ``ftfy.fix_text`` (mojibake, curly quotes, ligatures, full-width forms, control characters), HTML
    entities unescaped twice (``&amp;amp;`` → ``&``), white space runs collapsed to one space, stripped,
    lower-cased."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    # ftfy changes no printable ASCII text without "&": its fixes act on HTML entities, non-ASCII characters
    # (mojibake, C1 controls, ligatures, wide forms, curly quotes, surrogates, NFC) or control characters
    # (line breaks, terminal escapes), none of which such a text has. Skipping it there (every synthetic
    # caption) is the same result for a fifth of the data path's time.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """OpenAI CLIP's tokenizer: ``clean_text``, then the BPE of ``instant-clip-tokenizer``.

    ``tokenize(texts, context_length)`` gives an int64 ``[N, context_length]`` tensor with SOT first, EOT
    last (kept even when the text is truncated) and zero padding.
    """

    def __init__(self):
        try:
            import instant_clip_tokenizer
        except ImportError as exc:
            raise ImportError(
                "the CLIP tokenizer needs the instant-clip-tokenizer package (wheels for CPython 3.10-3.12): "
                "pip install instant-clip-tokenizer. Alternatives on other interpreters: OpenAI's "
                "clip.simple_tokenizer or open_clip.tokenizer produce the same ids."
            ) from exc
        self._tokenizer = instant_clip_tokenizer.Tokenizer()
        self.sot = self._tokenizer.start_of_text()
        self.eot = self._tokenizer.end_of_text()

    def tokenize(self, texts: list[str], context_length: int = LONG_CONTEXT) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        if not texts:
            return torch.zeros(0, context_length, dtype=torch.long)
        ids = self._tokenizer.tokenize_batch([clean_text(t) for t in texts], context_length=context_length)
        return torch.from_numpy(ids.astype("int64"))

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` including SOT and EOT, without truncation."""
        return len(self._tokenizer.encode(clean_text(text))) + 2


def trim_to_longest(ids: torch.Tensor) -> torch.Tensor:
    """Cut the trailing padding columns that no row uses (EOT included), keeping at least 2 columns.

    The text tower is causal and pooled at EOT, so this changes no output and saves the padded work.
    """
    if ids.numel() == 0:
        return ids[..., :2]
    used = (ids != 0).reshape(-1, ids.shape[-1]).any(dim=0)
    length = int(used.nonzero().max()) + 1 if used.any() else 2
    return ids[..., : max(length, 2)].contiguous()
