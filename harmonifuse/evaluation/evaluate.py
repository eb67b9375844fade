"""Score a model on manifests: transcripts for ASR utterances, closed-set label scoring for SER.

Several processes (a DDP run's dev scoring) can share one evaluation: given a :class:`Share`, each
answers its part of the batches and every process returns what one process alone would have.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from harmonifuse.data.batch import pad_hidden_states
from harmonifuse.data.manifest import Utterance
from harmonifuse.evaluation.metrics import asr_metrics, expected_calibration_error, ser_metrics
from harmonifuse.tasks import get_task


@dataclass(frozen=True)
class Share:
    """This process's part of an evaluation that ``world_size`` processes run together: of each list of
    batches (cut exactly as one process cuts them), batch ``i`` is answered by rank ``i % world_size``;
    then every rank's answers are gathered (``all_gather_object``: every rank must take part), so each
    returns the same results as one process, batch for batch. ``group``: the process group (None: the
    default one)."""

    rank: int
    world_size: int
    group: Any = None

    def map(self, count: int, answer: Callable[[int], list]) -> list[list]:
        """``answer(i)`` for the batches ``i < count`` this rank owns, then every rank's: one list per batch."""
        mine = {i: answer(i) for i in range(self.rank, count, self.world_size)}
        if self.world_size == 1:
            return [mine[i] for i in range(count)]
        import torch.distributed as dist

        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        return [everyone[i % self.world_size][i] for i in range(count)]


ALONE = Share(0, 1)
"""One process answers everything."""


def hidden_states_for(model, utterances: Sequence[Utterance], cache) -> tuple[torch.Tensor, torch.Tensor]:
    """(L+1, B, T, D) hidden states and (B,) frame lengths, from the cache or the encoder."""
    if cache is not None:
        hidden, lengths = pad_hidden_states([cache.get(u) for u in utterances])
        return hidden.to(model.llm.device), lengths.to(model.llm.device)
    encoded = model.encode(*model.load_waveforms([u.audio for u in utterances]))
    return encoded.hidden_states, encoded.lengths


@torch.no_grad()
def map_batches(model, utterances: Sequence[Utterance], answer, *, batch_size: int = 8, cache=None,
                progress: bool = True, desc: str = "evaluate", share: Share = ALONE) -> list:
    """``answer(hidden (L+1, B, T, D), lengths (B,))`` -> one result per item, over batches of similar
    length (little padding) in eval mode; results come back in input order. With a ``share`` of
    several processes, this one answers its batches and receives the others' (a collective)."""
    order = np.argsort([u.duration for u in utterances], kind="stable")
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    results: list = [None] * len(utterances)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress, leave=False) as bar:
            def run(b: int) -> list:
                chunk = [utterances[i] for i in batches[b]]
                hidden, lengths = hidden_states_for(model, chunk, cache)
                out = list(answer(hidden, lengths))
                bar.update(len(chunk) * share.world_size)  # the other ranks answer about as many meanwhile
                return out

            for index, answered in zip(batches, share.map(len(batches), run)):
                for i, result in zip(index, answered):
                    results[i] = result
    finally:
        model.train(was_training)
    return results


def predict(model, utterances: Sequence[Utterance], task: str, *, batch_size: int = 8, cache=None,
            prompt: str | None = None, progress: bool = True, desc: str | None = None,
            share: Share = ALONE) -> list[dict]:
    """One result dict per utterance (``transcript`` or ``emotion`` + ``emotion_probs``), in input order."""
    prompts = {task: prompt} if prompt else None
    return map_batches(model, utterances,
                       lambda hidden, lengths: model.analyze_hidden(hidden, lengths, tasks=(task,), prompts=prompts),
                       batch_size=batch_size, cache=cache, progress=progress, desc=desc or f"evaluate {task}",
                       share=share)


def ctc_asr_metrics(model, utterances: Sequence[Utterance], *, batch_size: int = 16, cache=None,
                    prompt: str | None = None, progress: bool = True, share: Share = ALONE) -> dict:
    """WER and CER of the projector's greedy CTC transcripts (no LLM): what the alignment stage reached.

    ``prompt``: the ASR prompt the fusion and gate read (default: the task's training prompt)."""
    hyps = map_batches(model, utterances, lambda h, n: model.ctc_transcribe_hidden(h, n, prompt),
                       batch_size=batch_size, cache=cache, progress=progress, desc="CTC transcripts", share=share)
    return asr_metrics([u.text for u in utterances], hyps, model.config.tasks.emotion_labels)


def ctc_ser_metrics(model, utterances: Sequence[Utterance], *, batch_size: int = 16, cache=None,
                    prompt: str | None = None, progress: bool = True, share: Share = ALONE) -> dict:
    """WA, UA and macro-F1 of the projector's closed-set CTC label scoring (no LLM)."""
    probs = map_batches(model, utterances, lambda h, n: model.ctc_classify_hidden(h, n, prompt),
                        batch_size=batch_size, cache=cache, progress=progress, desc="CTC labels", share=share)
    predictions = [max(p, key=p.get) for p in probs]
    return ser_metrics([u.emotion for u in utterances], predictions, model.config.tasks.emotion_labels)


CTC_SCORERS = {"transcript": ctc_asr_metrics, "label": ctc_ser_metrics}  # by how a task is answered


def evaluate_ctc(model, manifests: Mapping[str, Sequence[Utterance]], *, batch_size: int = 16, cache=None,
                 prompts: Mapping[str, str] | None = None, progress: bool = True, share: Share = ALONE) -> dict:
    """The front end alone (encoder, fusion, gate, projector) through its embedding-CTC head, no LLM:
    ``{"asr": [...], "ser": [...]}`` utterances -> ``{"metrics": {wer, cer, ..., wa, ua, macro_f1}}``."""
    if prompts:
        model.task_ids(list(prompts))
    metrics: dict = {}
    for task, utterances in manifests.items():
        scorer = CTC_SCORERS[get_task(task).answer]  # ValueError naming the known tasks
        if utterances:
            metrics.update(scorer(model, utterances, batch_size=batch_size, cache=cache,
                                  prompt=(prompts or {}).get(task), progress=progress, share=share))
    return {"metrics": metrics}


def detect_speech(model, utterances: Sequence[Utterance], *, batch_size: int = 32,
                  share: Share = ALONE) -> list[bool]:
    """Per utterance, whether the model's voice activity detector hears speech (all True without one)."""
    if getattr(model, "vad", None) is None:
        return [True] * len(utterances)
    starts = range(0, len(utterances), batch_size)
    answered = share.map(len(starts), lambda b: model.has_speech(
        model.load_arrays([u.audio for u in utterances[starts[b]:starts[b] + batch_size]])))
    return [flag for flags in answered for flag in flags]


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


def answer_any_length(model, utterances: Sequence[Utterance], task: str, *, batch_size: int = 8, cache=None,
                      prompt: str | None = None, progress: bool = True,
                      share: Share = ALONE) -> tuple[list[dict], list[bool]]:
    """Each utterance answered as ``analyze`` answers it, and whether it holds speech.

    Utterances within the encoder's window go in batches (from the feature cache when there is
    one) and are answered as no speech where the voice activity detector hears none; longer ones
    are cut at pauses and answered by segment, so one long line never aborts an evaluation.
    """
    limit = model.config.encoder.max_seconds
    long = [i for i, u in enumerate(utterances) if u.duration > limit]
    short = [i for i, u in enumerate(utterances) if u.duration <= limit]
    out: list[dict] = [{} for _ in utterances]
    speech = [True] * len(utterances)
    if short:
        chunk = [utterances[i] for i in short]
        answers = predict(model, chunk, task, batch_size=batch_size, cache=cache, prompt=prompt, progress=progress,
                          share=share)
        flags = detect_speech(model, chunk, batch_size=4 * batch_size, share=share)
        for i, answer, has in zip(short, answers, flags):
            out[i], speech[i] = (answer if has else model.no_speech_answer((task,))), has
    prompts = {task: prompt} if prompt else None
    with tqdm(total=len(long), desc=f"evaluate {task} (long recordings)", unit="utt",
              disable=not progress or not long, leave=False) as bar:
        def run(j: int) -> list[dict]:  # one recording per "batch", dealt out over a share's ranks
            answer = model.analyze(utterances[long[j]].audio, tasks=(task,), prompts=prompts, batch_size=batch_size)
            bar.update(share.world_size)
            return [answer]

        for i, [answer] in zip(long, share.map(len(long), run)):
            out[i], speech[i] = answer, not answer.get("no_speech", False)
    return out, speech


def _per_speaker(utterances: Sequence[Utterance], score) -> dict[str, dict]:
    """``score(indices)`` for each speaker's utterances, by speaker name."""
    indices: dict[str, list[int]] = {}
    for i, utterance in enumerate(utterances):
        indices.setdefault(utterance.speaker, []).append(i)
    return {speaker: score(idx) for speaker, idx in sorted(indices.items())}


def evaluate(model, manifests: Mapping[str, Sequence[Utterance]], *, batch_size: int = 8, cache=None,
             prompts: Mapping[str, str] | None = None, progress: bool = True, share: Share = ALONE) -> dict:
    """``{"asr": [...], "ser": [...]}`` utterances -> metrics and per-utterance predictions.

    Returns ``{"metrics": {...wer, cer, wa, ua, macro_f1..., "per_speaker": {speaker: {...}}},
    "predictions": {task: [...]}}``; ``per_speaker`` only when there are several speakers (the
    same metrics on each speaker's utterances, without the confusion matrix). With a ``share`` of
    several processes each answers its part, and all return these same results (a collective).
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
        out, speech = answer_any_length(model, utterances, task, batch_size=batch_size, cache=cache,
                                        prompt=(prompts or {}).get(task), progress=progress, share=share)
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
