"""A Kaldi data directory -> an ASR manifest.

Reads ``SRC/wav.scp`` (``<recording> <path>``) and ``SRC/text`` (``<utterance> <transcript>``),
plus optional ``SRC/utt2spk`` (``<utterance> <speaker>``; without it each utterance is its own
speaker, Kaldi's convention) and ``SRC/segments`` (``<utterance> <recording> <start> <end>``
in seconds, end -1 = to the end of the recording).

Only plain file paths are supported in wav.scp. Piped commands (``sox ... - |``) and archive
offsets (``feats.ark:123``) are rejected with the line that has them: run the commands once to
write audio files and list those instead. Relative paths are resolved against ``audio_root``,
by default the current directory (Kaldi scripts run from the recipe folder).

The manifest schema has no start/end fields, so with ``segments`` each segment is cut out of its
recording into ``OUT/<name>_segments/<utterance>.wav`` (16-bit PCM, the recording's sample rate).

Writes ``OUT/kaldi_<name>.jsonl`` where ``name`` is SRC's folder name.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import soundfile as sf

from harmonifuse.audio import AudioError
from harmonifuse.data.importers._common import (
    BadAudio,
    CorpusLayoutError,
    UtteranceCollector,
    audio_info,
    progress,
    require_dir,
    write,
)

_EXPECTED = ("a Kaldi data directory with 'wav.scp' (<recording> <path>) and 'text' "
             "(<utterance> <transcript>), optionally 'utt2spk' and 'segments'")
_ARCHIVE = re.compile(r"\.ark:\d+$")


class KaldiFormatError(ValueError):
    """A Kaldi file line this importer cannot use; the message names file, line and the fix."""


def prepare(src: Path, out: Path, *, corpus: str | None = None, audio_root: Path | None = None,
            on_bad_audio: BadAudio = "skip", progress_bar: bool = True) -> dict[str, Path]:
    """Write ``OUT/kaldi_<name>.jsonl``; returns ``{"all": manifest}``.

    Args:
        corpus: the manifest's ``corpus`` field (default: SRC's folder name).
        audio_root: folder relative wav.scp paths are relative to (default: current directory).
    """
    src = require_dir("a Kaldi data directory", src, _EXPECTED)
    missing = [name for name in ("wav.scp", "text") if not (src / name).is_file()]
    if missing:
        raise CorpusLayoutError("a Kaldi data directory", src, _EXPECTED, f"Missing: {', '.join(missing)}.")
    corpus = corpus or src.name
    base = Path(os.path.abspath(audio_root if audio_root is not None else os.getcwd()))
    recordings = _read_wav_scp(src / "wav.scp", base)
    texts = _read_table(src / "text")
    speakers = _read_table(src / "utt2spk") if (src / "utt2spk").is_file() else {}

    collector = UtteranceCollector(on_bad_audio)
    if (src / "segments").is_file():
        segments_dir = Path(os.path.abspath(out)) / f"{src.name}_segments"
        entries = _cut_segments(src / "segments", recordings, segments_dir, collector, progress_bar)
    else:
        entries = recordings
    for utt, audio in progress(entries.items(), f"kaldi {src.name}", enabled=progress_bar):
        text = texts.get(utt, "").strip()
        if not text:
            collector.skip(f"{src / 'text'}: {utt}", "no transcript")
            continue
        collector.add(audio, id=utt, corpus=corpus, speaker=speakers.get(utt, utt), text=text)
    collector.report(f"kaldi {src.name}")
    return {"all": write(out, f"kaldi_{src.name}.jsonl", collector.utterances, corpus)}


def _lines(path: Path):
    """(line number, key, rest) for every non-empty line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        key, _, rest = line.strip().partition(" ")
        if key:
            yield number, key, rest.strip()


def _read_table(path: Path) -> dict[str, str]:
    return {key: rest for _, key, rest in _lines(path)}


def _read_wav_scp(path: Path, base: Path) -> dict[str, Path]:
    """``{recording: absolute audio path}``; raises KaldiFormatError on pipes and archive offsets."""
    recordings = {}
    for number, key, rest in _lines(path):
        if rest.endswith("|"):
            raise KaldiFormatError(
                f"{path}:{number}: recording {key!r} is a piped command ({rest!r}), which is not "
                "supported; run the commands once to write audio files (e.g. wav) and list their "
                "paths in wav.scp instead")
        if _ARCHIVE.search(rest):
            raise KaldiFormatError(
                f"{path}:{number}: recording {key!r} points into an archive ({rest!r}), which is "
                "not supported; extract the audio to files (e.g. with wav-copy) and list their paths")
        if not rest:
            raise KaldiFormatError(f"{path}:{number}: recording {key!r} has no path; "
                                   "write '<recording> <path>'")
        recordings[key] = Path(os.path.normpath(base / rest))  # an absolute rest wins over base
    return recordings


def _cut_segments(path: Path, recordings: dict[str, Path], folder: Path,
                  collector: UtteranceCollector, progress_bar: bool) -> dict[str, Path]:
    """Cut every segment into ``folder/<utt>.wav``; returns ``{utterance: segment file}``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(_lines(path))
    cut: dict[str, Path] = {}
    for number, utt, rest in progress(rows, f"cutting {path.parent.name} segments", enabled=progress_bar):
        fields = rest.split()
        try:
            recording, start, end = fields[0], float(fields[1]), float(fields[2])
        except (IndexError, ValueError):
            raise KaldiFormatError(f"{path}:{number}: expected '<utterance> <recording> <start> "
                                   f"<end>', got {utt} {rest!r}; fix the line") from None
        if recording not in recordings:
            collector.skip(f"{path}:{number}", f"recording {recording!r} is not in wav.scp")
            continue
        source = recordings[recording]
        try:
            info = audio_info(source)
        except AudioError as error:
            collector.policy.handle(source, error)
            continue
        first = round(start * info.samplerate)
        # Kaldi's end -1 means "to the end"; ends slightly past the file are clipped as Kaldi does.
        last = info.frames if end < 0 else min(round(end * info.samplerate), info.frames)
        if last <= first:
            collector.skip(f"{path}:{number}", f"segment {utt!r} [{start}, {end}] is empty "
                                               f"(recording {recording!r} is {info.duration:.2f} s)")
            continue
        samples, rate = sf.read(str(source), start=first, stop=last, dtype="float32", always_2d=True)
        target = folder / f"{utt.replace(os.sep, '_')}.wav"
        sf.write(str(target), samples, rate, subtype="PCM_16")
        cut[utt] = target
    return cut
