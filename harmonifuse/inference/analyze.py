"""Answering audio: every task from one encoder pass, with how sure each answer is.

The model (:class:`harmonifuse.model.HarmoniFuse`) is the network; this module is what runs it on
audio, as whisper binds ``transcribe`` from its own file. :func:`analyze` (also
``HarmoniFuse.analyze``) groups inputs into batches by duration, answers audio without speech as
``no_speech`` instead of inventing a sentence, decodes transcripts with the joint CTC/LLM search
(:mod:`harmonifuse.decoding`), scores the emotion labels, and reads a recording longer than the
encoder's window in blocks, cuts it at pauses and answers it segment by segment. Its long loops
pass :func:`~harmonifuse.cancellation.checkpoint`, where work nobody waits for stops.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from harmonifuse.decoding import CTCScores
from harmonifuse.inference.batching import duration_batches, input_duration
from harmonifuse.cancellation import checkpoint
from harmonifuse.inference.inputs import AudioInput, load_arrays, long_source, padded
from harmonifuse.inference.int8 import inference_parts
from harmonifuse.modules.ctc import greedy_ctc_from_logits
from harmonifuse.tasks import TASK_NAMES, get_task
from harmonifuse.text import text_agreement

if TYPE_CHECKING:
    from harmonifuse.model import HarmoniFuse, SpeechEmbeddings
    from harmonifuse.segments import AudioSource


def ctc_scores(model: "HarmoniFuse", speech: "SpeechEmbeddings") -> CTCScores:
    """The CTC head's scores of ``speech`` for the search: posteriors (columns on demand when the
    vocabulary is scored in chunks: never the whole (B, N, V)) and the greedy transcripts."""
    table = model.llm.model.get_input_embeddings().weight
    if model.ctc.vocab_chunk:
        log_probs, blank = model.ctc.posteriors(speech.ctc_input, table, model.llm.ctc_blank_id)
        greedy = model.ctc.decode(speech.ctc_input, speech.lengths, table, model.llm.ctc_blank_id)
    else:
        log_probs, blank = model.ctc_log_probs(speech)
        greedy = greedy_ctc_from_logits(log_probs, speech.lengths, blank)
    return CTCScores(log_probs, speech.lengths, blank, greedy)


def transcribe_speech(model: "HarmoniFuse", speech: "SpeechEmbeddings", prompts: list[str]) -> list[dict]:
    """Transcripts with their confidence, decoded as ``model.decoding`` says.

    ``transcript_confidence`` = sqrt(LLM token probability x CTC agreement): the LLM's
    geometric-mean probability per token, and how much of its answer the CTC head, which only
    writes what it hears, wrote too (1 - character error rate between the two, clipped at 0).
    """
    d = model.config.decoding
    ctc = ctc_scores(model, speech)
    hyps = model.llm.decode(speech.embeddings, speech.lengths, prompts, beam_size=d.beam_size,
                            ctc_weight=d.ctc_weight, llm_candidates=d.llm_candidates,
                            ctc=ctc if d.ctc_weight > 0 else None,
                            drafts=ctc.tokens if d.draft == "ctc" else None, draft_tokens=d.draft_tokens,
                            stats=model.decode_stats)
    results = []
    for hyp, ctc_ids in zip(hyps, ctc.tokens):
        text = model.llm.detokenize(hyp.tokens)
        agreement = text_agreement(model.llm.detokenize(ctc_ids), text)
        results.append({"transcript": text,
                        "transcript_confidence": round(float(np.sqrt(hyp.llm_confidence * agreement)), 4)})
    return results


def classify_speech(model: "HarmoniFuse", speech: "SpeechEmbeddings", prompts: list[str]) -> list[dict]:
    """Closed-set emotion: every label's answer likelihood, temperature-calibrated, as probabilities."""
    labels = model.config.tasks.emotion_labels
    scores = model.llm.score_labels(speech.embeddings, speech.lengths, prompts, labels)
    probs = (scores.float() / model.config.calibration.ser_temperature).softmax(-1)
    results = []
    for row in probs.tolist():
        best = int(np.argmax(row))
        results.append({"emotion": labels[best], "emotion_confidence": round(row[best], 6),
                        "emotion_probs": dict(zip(labels, (round(p, 6) for p in row)))})
    return results


ANSWER_BY_KIND = {"transcript": transcribe_speech, "label": classify_speech}


@torch.no_grad()
def analyze_hidden(model: "HarmoniFuse", hidden_states: torch.Tensor, frame_lengths: torch.Tensor,
                   tasks: Sequence[str] = TASK_NAMES, prompts: dict[str, str] | None = None) -> list[dict]:
    """Every task from one set of encoder hidden states (L+1, B, T, D) and frame lengths (B,)."""
    B = hidden_states.shape[1]
    results: list[dict] = [{} for _ in range(B)]
    with inference_parts(model):
        for task in tasks:
            checkpoint()
            task_prompts = [(prompts or {}).get(task, model.config.tasks.prompts[task])] * B
            speech = model.speech_embeddings(hidden_states, frame_lengths, [task] * B, task_prompts)
            for r, out in zip(results, ANSWER_BY_KIND[get_task(task).answer](model, speech, task_prompts)):
                r.update(out)
    return results


def no_speech_answer(model: "HarmoniFuse", tasks: Sequence[str]) -> dict:
    """What a recording without speech is answered: no transcript, no emotion."""
    answer: dict = {"no_speech": True}
    kinds = {get_task(task).answer for task in tasks}
    if "transcript" in kinds:
        answer.update(transcript="", transcript_confidence=1.0)
    if "label" in kinds:
        answer.update(emotion=None, emotion_confidence=None, emotion_probs=None)
    return answer


def has_speech(model: "HarmoniFuse", waves: list[np.ndarray]) -> list[bool]:
    """Per waveform, whether the voice activity detector finds speech (all True when it is off)."""
    return model.vad.has_speech(waves) if model.vad is not None else [True] * len(waves)


@torch.no_grad()
def analyze(model: "HarmoniFuse", audio: AudioInput | Sequence[AudioInput], tasks: Sequence[str] = TASK_NAMES,
            prompts: dict[str, str] | None = None, *, batch_size: int = 8, progress: bool = False) -> dict | list[dict]:
    """Run the encoder once and answer every task from its hidden states.

    ``audio``: a path, a 16 kHz mono array, an ``(array, sample_rate)`` pair, or a list of them.
    Returns per input ``{"no_speech", "transcript", "transcript_confidence", "emotion",
    "emotion_confidence", "emotion_probs", "duration"}`` (a list for a list). Audio in which the
    voice activity detector finds no speech is answered ``no_speech: true``, with an empty
    transcript and no emotion, instead of being passed to the LLM. Inputs go ``batch_size`` at a
    time, grouped by duration (harmonifuse/inference/batching.py), so memory does not grow with
    the number of inputs.

    A recording longer than ``model.encoder.max_seconds`` is read in blocks, cut at pauses
    (harmonifuse/segments.py) and answered segment by segment, ``batch_size`` segments at a
    time; its answer adds ``segments`` ``[{start, end, transcript, emotion, ...}]`` (seconds)
    and ``duration``, joins the transcripts and weights the emotion by segment duration.
    """
    single = not isinstance(audio, list)
    items = [audio] if single else list(audio)
    was_training = model.training
    model.eval()
    try:
        results: list[dict | None] = [None] * len(items)
        sources = {i: source for i, source in enumerate(long_source(model, item) for item in items)
                   if source is not None}
        for i, source in sources.items():
            results[i] = answer_long(model, source, tasks, prompts, batch_size=batch_size, progress=progress)
        short = [i for i in range(len(items)) if i not in sources]
        # batch_size inputs at a time, grouped by duration: memory stays flat in the number of inputs
        plan = duration_batches([input_duration(items[i]) for i in short], max(1, batch_size))
        for batch in (b for window in plan for b in window):
            checkpoint()
            index = [short[j] for j in batch]
            for i, result in zip(index, answer_short(model, [items[i] for i in index], tasks, prompts)):
                results[i] = result
    finally:
        model.train(was_training)
    return results[0] if single else results


def answer_short(model: "HarmoniFuse", items: list, tasks: Sequence[str],
                 prompts: dict[str, str] | None) -> list[dict]:
    """One batch of inputs, each within the encoder's window: one encoder pass, every task."""
    from harmonifuse.audio import SAMPLE_RATE

    waves = load_arrays(model, items)
    results = [no_speech_answer(model, tasks) for _ in waves]
    kept = [i for i, flag in enumerate(has_speech(model, waves)) if flag]
    if kept:
        encoded = model.encode(*padded(model, [waves[i] for i in kept]))
        for i, result in zip(kept, analyze_hidden(model, encoded.hidden_states, encoded.lengths, tasks, prompts)):
            results[i] = {"no_speech": False, **result}
    for result, wave in zip(results, waves):
        result["duration"] = round(len(wave) / SAMPLE_RATE, 3)
    return results


def answer_long(model: "HarmoniFuse", source: "AudioSource", tasks: Sequence[str], prompts: dict[str, str] | None,
                *, batch_size: int, progress: bool) -> dict:
    """A long recording: its speech segments in batches, combined (see :func:`analyze`)."""
    from tqdm import tqdm

    from harmonifuse.segments import combine, speech_probabilities, split_at_pauses

    vad = model.vad if model.vad is not None else model._segmenter
    name = Path(source.name).name
    with tqdm(total=round(source.duration, 1), unit="s", desc=f"{name}: finding speech",
              disable=not progress, leave=False) as bar:
        probs = speech_probabilities(source, vad, progress=bar)
    segments = split_at_pauses(probs, duration=source.duration, threshold=vad.threshold,
                               max_seconds=model.config.encoder.max_seconds - 0.5)  # resampling rounds up
    if not segments:
        return {**no_speech_answer(model, tasks), "segments": [], "duration": round(source.duration, 3)}
    answers: list[dict] = []
    with tqdm(total=len(segments), unit="segment", desc=f"{name}: answering", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(segments), batch_size):
            checkpoint()
            chunk = segments[start:start + batch_size]
            answers += answer_short(model, [source.read(s) for s in chunk], tasks, prompts)
            bar.update(len(chunk))
    return {**combine(answers, segments, model.config.tasks.emotion_labels), "duration": round(source.duration, 3)}


def transcribe(model: "HarmoniFuse", audio: AudioInput | Sequence[AudioInput]) -> str | list[str]:
    """The transcript of each input (a string for one input, a list for a list)."""
    out = analyze(model, audio, tasks=("asr",))
    return out["transcript"] if isinstance(out, dict) else [r["transcript"] for r in out]


def recognize_emotion(model: "HarmoniFuse", audio: AudioInput | Sequence[AudioInput]):
    """-> (label, {label: probability}) per input."""
    out = analyze(model, audio, tasks=("ser",))
    if isinstance(out, dict):
        return out["emotion"], out["emotion_probs"]
    return [(r["emotion"], r["emotion_probs"]) for r in out]
