"""ASR and SER metrics: jiwer for error rates, scikit-learn for classification.

WER/CER are computed after the project's one text normalisation (:mod:`harmonifuse.text`: digits
spelt out, lower case, no punctuation, whitespace collapsed); ``wer_raw`` compares the texts as
they are, without it.

``label_answers`` measures task confusion in a multi-task model: the share of ASR answers whose
first word is an emotion label while the reference's is not, i.e. the ASR prompt answered as if
it were the SER one (such answers often run on into repetition, which inflates the WER).
"""
from __future__ import annotations

from typing import Sequence

import jiwer
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from harmonifuse.text import NORMALIZE, normalize_text, spell_numbers, text_agreement  # noqa: F401 (re-exported)


def asr_metrics(references: Sequence[str], hypotheses: Sequence[str],
                labels: Sequence[str] = ()) -> dict[str, float]:
    """Corpus-level WER and CER after normalisation, the raw WER, and with ``labels`` (the SER
    label set) the share of answers that start with a label word (``label_answers``)."""
    if len(references) != len(hypotheses) or not references:
        raise ValueError(f"need as many hypotheses as references (got {len(hypotheses)} and {len(references)})")
    refs = [normalize_text(r) for r in references]
    hyps = [normalize_text(h) for h in hypotheses]
    if not all(refs):
        raise ValueError("a reference transcript is empty after normalisation")
    raw_refs = [r.strip() for r in references]
    raw_hyps = [h.strip() for h in hypotheses]
    metrics = {
        "wer": jiwer.wer(refs, hyps),
        "cer": jiwer.cer(refs, hyps),
        "wer_raw": jiwer.wer(raw_refs, raw_hyps),
    }
    if labels:
        words = {normalize_text(label) for label in labels}
        first = [(r.split()[0], h.split()[0] if h else "") for r, h in zip(refs, hyps)]
        metrics["label_answers"] = sum(h in words and r not in words for r, h in first) / len(refs)
    return {**metrics, "n_asr": len(refs)}


def ser_metrics(references: Sequence[str], predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """WA (accuracy), UA (mean per-class recall over ``labels``), macro-F1 and the confusion matrix.

    Rows of ``confusion`` are the reference labels, columns the predictions, both in ``labels`` order.
    """
    if len(references) != len(predictions) or not references:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    unknown = set(references) - set(labels)
    if unknown:
        raise ValueError(f"reference label(s) {sorted(unknown)} are not in the label set {list(labels)}")
    present = [label for label in labels if label in set(references)]
    return {
        "wa": float(accuracy_score(references, predictions)),
        "ua": float(recall_score(references, predictions, labels=present, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(references, predictions, labels=present, average="macro", zero_division=0)),
        "confusion": confusion_matrix(references, predictions, labels=list(labels)).tolist(),
        "labels": list(labels),
        "n_ser": len(references),
    }


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """ECE: the mean |accuracy - confidence| over ``bins`` equal-width confidence bins, weighted
    by the share of predictions in each (Guo et al., 2017)."""
    confidences = np.asarray(confidences, dtype=float)
    correct = np.asarray(correct, dtype=float)
    if len(confidences) != len(correct) or not len(confidences):
        raise ValueError(f"need as many outcomes as confidences (got {len(correct)} and {len(confidences)})")
    which = np.minimum((confidences * bins).astype(int), bins - 1)
    error = 0.0
    for k in range(bins):
        members = which == k
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidences[members].mean())
    return float(error)


def dev_score(metrics: dict) -> float:
    """The one figure a run keeps its best model by: the mean of 1 - WER (capped at 1) and UA, of
    whichever of the two ``metrics`` holds."""
    parts = []
    if "wer" in metrics:
        parts.append(1 - min(1.0, metrics["wer"]))
    if "ua" in metrics:
        parts.append(metrics["ua"])
    return sum(parts) / len(parts)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0
