"""Score a model on manifests: transcripts for ASR utterances, closed-set label scoring for SER."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from harmonifuse.data.batch import pad_hidden_states
from harmonifuse.data.manifest import Utterance
from harmonifuse.evaluation.metrics import asr_metrics, expected_calibration_error, ser_metrics
from harmonifuse.tasks import get_task


def hidden_states_for(model, utterances: Sequence[Utterance], cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(L+1, B, T, D) hidden states and (B,) frame lengths, from the cache or the encoder."""
    if cache is not None:
        hidden, lengths = pad_hidden_states([cache.get(u) for u in utterances])
        return hidden.to(model.llm.device), lengths.to(model.llm.device)
    encoded = model.encode(*model.load_waveforms([u.audio for u in utterances]))
    return encoded.hidden_states, encoded.lengths


@torch.no_grad()
def map_batches(model, utterances: Sequence[Utterance], answer, *, batch_size: int = 8, cache=None,
                progress: bool = True, desc: str = "evaluate") -> list:
    """``answer(hidden (L+1, B, T, D), lengths (B,))`` -> one result per item, over batches of similar
    length (little padding) in eval mode; results come back in input order."""
    order = np.argsort([u.duration for u in utterances], kind="stable")
    results: list = [None] * len(utterances)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                chunk = [utterances[i] for i in index]
                hidden, lengths = hidden_states_for(model, chunk, cache)
                for i, result in zip(index, answer(hidden, lengths)):
                    results[i] = result
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results


def predict(model, utterances: Sequence[Utterance], task: str, *, batch_size: int = 8, cache=None,
            prompt: str | None = None, progress: bool = True, desc: str | None = None) -> list[dict]:
    """One result dict per utterance (``transcript`` or ``emotion`` + ``emotion_probs``), in input order."""
    prompts = {task: prompt} if prompt else None
    return map_batches(model, utterances,
                       lambda hidden, lengths: model.analyze_hidden(hidden, lengths, tasks=(task,), prompts=prompts),
                       batch_size=batch_size, cache=cache, progress=progress, desc=desc or f"evaluate {task}")


def ctc_asr_metrics(model, utterances: Sequence[Utterance], *, batch_size: int = 16, cache=None,
                    prompt: str | None = None, progress: bool = True) -> dict:
    """WER and CER of the projector's greedy CTC transcripts (no LLM): what the alignment stage reached.

    ``prompt``: the ASR prompt the fusion and gate read (default: the task's training prompt)."""
    hyps = map_batches(model, utterances, lambda h, n: model.ctc_transcribe_hidden(h, n, prompt),
                       batch_size=batch_size, cache=cache, progress=progress, desc="CTC transcripts")
    return asr_metrics([u.text for u in utterances], hyps, model.config.tasks.emotion_labels)


def ctc_ser_metrics(model, utterances: Sequence[Utterance], *, batch_size: int = 16, cache=None,
                    prompt: str | None = None, progress: bool = True) -> dict:
    """WA, UA and macro-F1 of the projector's closed-set CTC label scoring (no LLM)."""
    probs = map_batches(model, utterances, lambda h, n: model.ctc_classify_hidden(h, n, prompt),
                        batch_size=batch_size, cache=cache, progress=progress, desc="CTC labels")
    predictions = [max(p, key=p.get) for p in probs]
    return ser_metrics([u.emotion for u in utterances], predictions, model.config.tasks.emotion_labels)


CTC_SCORERS = {"transcript": ctc_asr_metrics, "label": ctc_ser_metrics}  # by how a task is answered


def evaluate_ctc(model, manifests: Mapping[str, Sequence[Utterance]], *, batch_size: int = 16, cache=None,
                 prompts: Mapping[str, str] | None = None, progress: bool = True) -> dict:
    """The front end alone (encoder, fusion, gate, projector) through its embedding-CTC head, no LLM:
    ``{"asr": [...], "ser": [...]}`` utterances -> ``{"metrics": {wer, cer, ..., wa, ua, macro_f1}}``."""
    if prompts:
        model.task_ids(list(prompts))
    metrics: dict = {}
    for task, utterances in manifests.items():
        scorer = CTC_SCORERS[get_task(task).answer]  # ValueError naming the known tasks
        if utterances:
            metrics.update(scorer(model, utterances, batch_size=batch_size, cache=cache,
                                             prompt=(prompts or {}).get(task), progress=progress))
    return {"metrics": metrics}


def detect_speech(model, utterances: Sequence[Utterance], *, batch_size: int = 32) -> list[bool]:
    """Per utterance, whether the model's voice activity detector hears speech (all True without one)."""
    if getattr(model, "vad", None) is None:
        return [True] * len(utterances)
    flags: list[bool] = []
    for start in range(0, len(utterances), batch_size):
        chunk = utterances[start:start + batch_size]
        flags += model.has_speech(model.load_arrays([u.audio for u in chunk]))
    return flags


def nonspeech_metrics(model, *, seconds: float = 3.0) -> dict:
    """How the model answers the built-in non-speech clips (harmonifuse/data/nonspeech.py):
    ``nonspeech_detected``, the share answered as no speech (or refused as silent audio), and each
    clip's answer."""
    from harmonifuse.audio import AudioError
    from harmonifuse.data.nonspeech import nonspeech_clips

    clips = nonspeech_clips(seconds)
    answers = []
    names = list(clips)
    for name in names:  # one by one: without a voice activity detector silence is refused, not answered
        try:
            answers.append(model.analyze(clips[name]))
        except AudioError as error:
            answers.append({"no_speech": True, "refused": error.problem})
    detected = [bool(a.get("no_speech")) for a in answers]
    return {"nonspeech_detected": float(np.mean(detected)), "n_nonspeech": len(names),
            "clips": [{"clip": n, "no_speech": d, "transcript": a.get("transcript"), "emotion": a.get("emotion"),
                       "emotion_confidence": a.get("emotion_confidence")}
                      for n, d, a in zip(names, detected, answers)]}


def _per_speaker(utterances: Sequence[Utterance], score) -> dict[str, dict]:
    """``score(indices)`` for each speaker's utterances, by speaker name."""
    indices: dict[str, list[int]] = {}
    for i, utterance in enumerate(utterances):
        indices.setdefault(utterance.speaker, []).append(i)
    return {speaker: score(idx) for speaker, idx in sorted(indices.items())}


def evaluate(model, manifests: Mapping[str, Sequence[Utterance]], *, batch_size: int = 8, cache=None,
             prompts: Mapping[str, str] | None = None, progress: bool = True) -> dict:
    """``{"asr": [...], "ser": [...]}`` utterances -> metrics and per-utterance predictions.

    Returns ``{"metrics": {...wer, cer, wa, ua, macro_f1..., "per_speaker": {speaker: {...}}},
    "predictions": {task: [...]}}``; ``per_speaker`` only when there are several speakers (the
    same metrics on each speaker's utterances, without the confusion matrix).
    """
    if prompts:
        model.task_ids(list(prompts))  # a misspelt task would otherwise silently keep its canonical prompt
    labels = model.config.tasks.emotion_labels
    metrics: dict = {}
    per_speaker: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    for task, utterances in manifests.items():
        if not utterances:
            continue
        out = predict(model, utterances, task, batch_size=batch_size, cache=cache,
                      prompt=(prompts or {}).get(task), progress=progress)
        speech = detect_speech(model, utterances, batch_size=4 * batch_size)
        out = [r if has else model.no_speech_answer((task,)) for r, has in zip(out, speech)]
        if getattr(model, "vad", None) is not None:
            metrics[f"{task}_flagged_no_speech"] = 1.0 - float(np.mean(speech))
        kind = get_task(task).answer
        if kind == "transcript":
            refs = [u.text for u in utterances]
            hyps = [r["transcript"] for r in out]
            metrics.update(asr_metrics(refs, hyps, labels))
            metrics["asr_confidence"] = float(np.mean([r["transcript_confidence"] for r in out]))
            scores = _per_speaker(utterances, lambda idx: asr_metrics([refs[i] for i in idx],
                                                                      [hyps[i] for i in idx], labels))
            predictions[task] = [{"id": u.id, "speaker": u.speaker, "reference": ref, "hypothesis": hyp,
                                  "confidence": r["transcript_confidence"], "no_speech": not has}
                                 for u, ref, hyp, r, has in zip(utterances, refs, hyps, out, speech)]
        else:  # one label out of model.tasks.emotion_labels
            refs = [u.emotion for u in utterances]
            preds = [r["emotion"] or "no_speech" for r in out]
            metrics.update(ser_metrics(refs, preds, labels))
            confidence = [r["emotion_confidence"] or 0.0 for r in out]
            metrics["ser_confidence"] = float(np.mean(confidence))
            metrics["ser_ece"] = expected_calibration_error(confidence, [p == r for p, r in zip(preds, refs)])
            scores = _per_speaker(utterances, lambda idx: {
                k: v for k, v in ser_metrics([refs[i] for i in idx], [preds[i] for i in idx], labels).items()
                if k not in ("confusion", "labels")})
            predictions[task] = [{"id": u.id, "speaker": u.speaker, "reference": ref, "prediction": r["emotion"],
                                  "confidence": r["emotion_confidence"], "probs": r["emotion_probs"]}
                                 for u, ref, r in zip(utterances, refs, out)]
        for speaker, values in scores.items():
            per_speaker.setdefault(speaker, {}).update(values)
    if len(per_speaker) > 1:
        metrics["per_speaker"] = dict(sorted(per_speaker.items()))
    return {"metrics": metrics, "predictions": predictions}
