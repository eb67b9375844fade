"""Natural English sentences from WordNet's quoted usage examples, for the synthetic corpus.

WordNet 3.0 (Debian ``wordnet-base``) glosses carry about 48,000 quoted usage examples, e.g.
``"when you have to hiccup, drink a glass of cold water"``. :func:`load_sentences` keeps the ones
a speech synthesiser reads exactly as written, so that the transcript equals what is spoken:

- capitalised (a sentence, not a phrase fragment), 5-20 words;
- ASCII letters, spaces, apostrophes inside words and the punctuation ``, . ; : ? ! -`` only:
  no digits, currency, brackets, slashes, quotes or other symbols (read aloud unpredictably);
- no abbreviations: no period inside the sentence (``Mr.``, ``U.S.``, ``e.g.``), no known
  period-less abbreviations (``Mr``, ``Dr``, ``St``, ``etc``...), no word with two or more
  capitals (acronyms, Roman numerals, ``CDs``, ``McKinley``), no single letters other than
  ``a``/``I`` (``x rayed``, ``T shirts``, ``middle C``), no word without a vowel;
- no dashes used as punctuation (``--``, `` - ``), no ellipses.

Each kept sentence yields two strings: ``spoken`` (what the synthesiser reads: the sentence with
its punctuation, hyphens between words turned into spaces, a final period added when missing) and
``text`` (the transcript: the same words in their natural casing with punctuation removed, except
apostrophes inside words; single spaces). Lower-casing is left to the evaluation's normaliser.

WordNet 3.0 licence (use, copy, modify, distribute for any purpose, keeping the notice):
:data:`WORDNET_NOTICE` is written beside every corpus built from these sentences.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WORDNET_DIR", "WORDNET_NOTICE", "Sentence", "load_sentences", "wordnet_files"]

WORDNET_DIR = Path("/usr/share/wordnet")
_POS = ("noun", "verb", "adj", "adv")

WORDNET_NOTICE = """\
This corpus contains sentences taken from the usage examples of WordNet 3.0
(Debian package wordnet-base, /usr/share/wordnet/data.{noun,verb,adj,adv}),
filtered and with punctuation removed from the transcripts. WordNet's licence:

WordNet Release 3.0

This software and database is being provided to you, the LICENSEE, by
Princeton University under the following license.  By obtaining, using
and/or copying this software and database, you agree that you have
read, understood, and will comply with these terms and conditions.:

Permission to use, copy, modify and distribute this software and
database and its documentation for any purpose and without fee or
royalty is hereby granted, provided that you agree to comply with
the following copyright notice and statements, including the disclaimer,
and that the same appear on ALL copies of the software, database and
documentation, including modifications that you make for internal
use or for distribution.

WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved.

THIS SOFTWARE AND DATABASE IS PROVIDED "AS IS" AND PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR
IMPLIED.  BY WAY OF EXAMPLE, BUT NOT LIMITATION, PRINCETON
UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES OF MERCHANT-
ABILITY OR FITNESS FOR ANY PARTICULAR PURPOSE OR THAT THE USE
OF THE LICENSED SOFTWARE, DATABASE OR DOCUMENTATION WILL NOT
INFRINGE ANY THIRD PARTY PATENTS, COPYRIGHTS, TRADEMARKS OR
OTHER RIGHTS.

The name of Princeton University or Princeton may not be used in
advertising or publicity pertaining to distribution of the software
and/or database.  Title to copyright in this software, database and
any associated documentation shall at all times remain with
Princeton University and LICENSEE agrees to preserve same.
"""

MIN_WORDS = 5
MAX_WORDS = 20

_QUOTE = re.compile(r'"([^"]*)"')
_ALLOWED = re.compile(r"[A-Za-z ',.;:?!\-]+")
# A word: letters, optionally joined by single hyphens or one inner apostrophe ("don't",
# "well-known", "o'clock"), or a plural possessive ending in "s'" ("the boys' room").
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?(?:-[A-Za-z]+(?:'[A-Za-z]+)?)*|[A-Za-z]*s'")
_VOWEL = re.compile(r"[aeiouyAEIOUY]")
_ABBREVIATIONS = frozenset(
    # period-less abbreviations that are not also ordinary words ("no", "fig", "rep" are kept)
    "mr mrs ms dr st jr sr etc vs inc ltd corp capt lt sgt prof gov ft mt ave blvd dept univ "
    "approx esp cf ie eg".split()
)


@dataclass(frozen=True)
class Sentence:
    """One usable sentence: ``spoken`` is read by the synthesiser, ``text`` is the transcript."""

    spoken: str
    text: str


def wordnet_files(root: Path = WORDNET_DIR) -> list[Path]:
    """The four WordNet data files, or FileNotFoundError naming the Debian package."""
    files = [root / f"data.{pos}" for pos in _POS]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data files not found: {', '.join(missing)}; "
            "install them with `apt-get install flite espeak-ng wordnet-base`"
        )
    return files


def _usable(quote: str) -> Sentence | None:
    """The filtered sentence for one quoted example, or None if it cannot be read verbatim."""
    s = " ".join(quote.split())
    if not s or not s[0].isupper() or not s[0].isascii():
        return None
    if not _ALLOWED.fullmatch(s) or "--" in s or " -" in s or "- " in s or ".." in s:
        return None
    body = s.rstrip(".?!")
    if not body or any(ch in body for ch in ".?!"):  # inner periods: abbreviations, initials
        return None
    words = re.sub(r"[,;:]", " ", body).split()
    for word in words:
        if not _WORD.fullmatch(word):
            return None
        if word.lower() in _ABBREVIATIONS:
            return None
    text = " ".join(" ".join(words).replace("-", " ").split())
    tokens = text.split()
    if not MIN_WORDS <= len(tokens) <= MAX_WORDS:  # counted as spoken: "well known" is 2
        return None
    for token in tokens:
        stem = token.split("'")[0]
        if sum(ch.isupper() for ch in token) >= 2:  # CDs, McKinley, WordNet: spelled or odd
            return None
        if len(stem) == 1 and stem not in ("a", "A", "I"):  # x rayed, T shirts, r's, middle C
            return None
        if not _VOWEL.search(token):  # Th (a typo), hmm, psst
            return None
    spoken = body.replace("-", " ") + (s[len(body):][:1] or ".")
    return Sentence(spoken=spoken, text=text)


def load_sentences(root: Path = WORDNET_DIR) -> list[Sentence]:
    """All usable, distinct sentences (distinct transcripts), in a fixed content-derived order.

    The order is sorted by a hash of the transcript: stable across runs and machines, and not
    alphabetical (so a prefix of the list is not biased towards one initial letter).
    """
    by_text: dict[str, Sentence] = {}
    for path in wordnet_files(root):
        with open(path, encoding="latin-1") as handle:
            for line in handle:
                if line.startswith("  ") or "|" not in line:  # licence header
                    continue
                for quote in _QUOTE.findall(line.split("|", 1)[1]):
                    sentence = _usable(quote)
                    if sentence is not None:
                        key = sentence.text.lower()
                        if key not in by_text or sentence.spoken < by_text[key].spoken:
                            by_text[key] = sentence
    return sorted(by_text.values(),
                  key=lambda s: (hashlib.sha1(s.text.lower().encode()).hexdigest(), s.text))
