"""The end of a long text, found without tokenizing all of it.

A prompt (or a prompt and completion a reward model scores) keeps its last tokens when it is too
long; tokenizing a 20 MB row in full to keep a few hundred tokens took 50 s and 4.4 GB.
"""

from __future__ import annotations

import re

# A first guess at the characters that hold max_tokens tokens (text runs 3-5 per token); the cut
# is checked against the tokens it yields, so a wrong guess costs a retry, never a shorter prompt.
CHARS_PER_TOKEN = 16
# Tokens of a cut text's tail beyond the kept ones: the cut lands at a word start, so only the first
# word or two after it can be split otherwise than in the whole text, and those are dropped.
CUT_MARGIN = 32
_WORD_START = re.compile(r"(?<=\s)\S")


def text_tail(tokenizer, text: str, max_tokens: int) -> str:
    """The end of ``text`` whose tokens end with the last ``max_tokens`` tokens of the whole text,
    so a text of megabytes is not tokenized in full to keep a few hundred tokens. The text is cut at a
    word start (pre-tokenizers split there, so the kept tokens are those of the whole text), with the
    window growing 4x until its tokens cover the kept ones and a margin, or it is the whole text."""
    keep = max_tokens * CHARS_PER_TOKEN
    while keep < len(text):
        start = len(text) - keep
        word = _WORD_START.search(text, start, start + keep // 2)
        tail = text[word.start() if word else start :]
        ids = tokenizer(tail, add_special_tokens=False, verbose=False)["input_ids"]  # no too-long warning
        if len(ids) >= max_tokens + CUT_MARGIN:
            return tail
        keep *= 4
    return text
