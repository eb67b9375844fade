"""Answers in the formats of OpenAI's audio API, built from a result of ``model.analyze``.

- ``json``: ``{"text", "usage"}``;
- ``text``: the transcript and a newline;
- ``verbose_json``: ``{task, language, duration, text, segments, emotion, usage}``; the segments
  are the long-recording segments where the model gave them, else one over the whole clip; each
  segment and the whole answer carry ``emotion`` ``{label, confidence, probabilities}`` (an extra
  key, ignored by OpenAI clients);
- ``srt`` / ``vtt``: subtitles from the same segments (:mod:`harmonifuse.formats`).
"""
from __future__ import annotations

import math
import zlib

from starlette.responses import JSONResponse, PlainTextResponse, Response

from harmonifuse import formats

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
LANGUAGE = "english"


def _emotion(result: dict) -> dict | None:
    if result.get("emotion") is None:
        return None
    return {"label": result["emotion"], "confidence": result.get("emotion_confidence"),
            "probabilities": result.get("emotion_probs")}


def _compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 0.0


def segments(result: dict) -> list[dict]:
    """OpenAI's segment objects for the stretches with a transcript (none for silence)."""
    parts = result.get("segments")
    if parts is None:
        parts = [{"start": 0.0, "end": result.get("duration", 0.0), **result}]
    out = []
    for part in parts:
        text = (part.get("transcript") or "").strip()
        if part.get("no_speech") or not text:
            continue
        confidence = part.get("transcript_confidence")
        out.append({
            "id": len(out), "seek": 0, "start": part["start"], "end": part["end"], "text": text, "tokens": [],
            "temperature": 0.0,
            # the model gives a confidence in (0, 1], not token log-probabilities: its log stands in
            "avg_logprob": round(math.log(max(confidence, 1e-6)), 4) if confidence is not None else None,
            "compression_ratio": _compression_ratio(text), "no_speech_prob": 0.0, "emotion": _emotion(part)})
    return out


def usage(result: dict) -> dict:
    return {"type": "duration", "seconds": result.get("duration", 0.0)}


def transcription(result: dict, response_format: str) -> Response:
    text = result.get("transcript") or ""
    if response_format == "json":
        return JSONResponse({"text": text, "usage": usage(result)})
    if response_format == "text":
        return PlainTextResponse(text + "\n")
    if response_format == "verbose_json":
        return JSONResponse({"task": "transcribe", "language": LANGUAGE, "duration": result.get("duration", 0.0),
                             "text": text, "segments": segments(result), "emotion": _emotion(result),
                             "usage": usage(result)})
    if response_format == "srt":
        return PlainTextResponse(formats.to_srt(result))
    if response_format == "vtt":
        return Response(formats.to_vtt(result), media_type="text/vtt; charset=utf-8")
    raise ValueError(response_format)
