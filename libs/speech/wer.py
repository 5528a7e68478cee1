"""Word error rate: how far a recognised transcript is from the words that were said.

WER = (substitutions + deletions + insertions) / words of the reference, over words
normalised by `words` (lower case, punctuation dropped, apostrophes kept: "Don't!" and
"don't" are the same word). It can exceed 1 when the hypothesis adds many words.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """The words of `text`, normalised for comparison."""
    return [w.strip("'") for w in _WORD.findall(text.lower()) if w.strip("'")]


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance between two word lists (each edit costs 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, start=1):
        current = [i]
        for j, hyp_word in enumerate(hypothesis, start=1):
            current.append(
                min(
                    previous[j] + 1,  # deletion
                    current[j - 1] + 1,  # insertion
                    previous[j - 1] + (ref_word != hyp_word),  # substitution or match
                )
            )
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits per reference word. An empty reference gives 0.0 for an empty hypothesis and
    1.0 for any other (nothing was said, something was heard)."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_distance(ref, hyp) / len(ref)
