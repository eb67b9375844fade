"""Comparing transcripts: the one text normalisation of the project, and how much two agree.

Normalisation (applied to reference and hypothesis alike): numbers written in digits spelt out in
words (inflect: "10" -> "ten", "121" -> "one hundred twenty one"), lower case, punctuation removed
(jiwer's RemovePunctuation, Unicode category P), whitespace collapsed. Used by the metrics
(:mod:`harmonifuse.evaluation.metrics`), by inference for the transcript's confidence, and by the
importers that check a corpus's pairs.
"""
from __future__ import annotations

import functools
import re

import jiwer

NORMALIZE = jiwer.Compose([
    jiwer.ToLowerCase(),
    jiwer.RemovePunctuation(),
    jiwer.RemoveMultipleSpaces(),
    jiwer.Strip(),
])


_NUMBER = re.compile(r"(?<!\w)\d+(?:[.,]\d+)*(?!\w)")  # whole numbers only: "mp3" and "10th" stay


@functools.lru_cache(maxsize=1)
def _inflect():
    import inflect

    return inflect.engine()


def spell_numbers(text: str) -> str:
    """Digits -> words, so that "10 of clubs" and "ten of clubs" compare equal."""
    def words(match: re.Match) -> str:
        return " " + _inflect().number_to_words(match.group(0).replace(",", ""), andword="").replace("-", " ") + " "

    return _NUMBER.sub(words, text) if any(c.isdigit() for c in text) else text


def normalize_text(text: str) -> str:
    return NORMALIZE(spell_numbers(text))


def text_agreement(a: str, b: str) -> float:
    """How much two transcripts of the same audio agree: 1 - CER(a -> b) after normalisation,
    clipped to [0, 1] (1 when both are empty, 0 when only one is)."""
    a, b = normalize_text(a), normalize_text(b)
    if not a or not b:
        return float(a == b)
    return max(0.0, 1.0 - jiwer.cer(a, b))
