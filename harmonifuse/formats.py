"""Answers as text, SRT or WebVTT subtitles (the ``srt`` and ``webvtt-py`` packages write them).

A long recording's answer carries ``segments`` with times; a short one is one cue over its
whole ``duration``. Segments without speech or with an empty transcript give no cue.
"""
from __future__ import annotations

from datetime import timedelta

FORMATS = ("json", "text", "srt", "vtt")


def cues(result: dict) -> list[tuple[float, float, str]]:
    """(start, end, text) in seconds for every segment with a transcript."""
    segments = result.get("segments")
    if segments is None:
        segments = [{"start": 0.0, "end": result.get("duration", 0.0), **result}]
    return [(s["start"], s["end"], s["transcript"].strip()) for s in segments
            if not s.get("no_speech") and s.get("transcript", "").strip()]


def to_srt(result: dict) -> str:
    import srt

    return srt.compose([srt.Subtitle(index=i, start=timedelta(seconds=start), end=timedelta(seconds=end),
                                     content=text) for i, (start, end, text) in enumerate(cues(result), 1)])


def _vtt_time(seconds: float) -> str:
    millis = int(round(seconds * 1000))
    return f"{millis // 3_600_000:02d}:{millis // 60_000 % 60:02d}:{millis // 1000 % 60:02d}.{millis % 1000:03d}"


def to_vtt(result: dict) -> str:
    from webvtt import Caption, WebVTT

    return WebVTT(captions=[Caption(_vtt_time(start), _vtt_time(end), text)
                            for start, end, text in cues(result)]).content
