"""The main job (``make demo``): the shipped model on real recordings, on noise and on the built-in test split.

1. builds the built-in synthetic corpus into ``data/synthetic`` if it is missing, the real-speech
   corpus (game dialogue from two Debian packages, ``harmonifuse prepare real-speech``) into
   ``data/real-speech``, and the manifest of the ten transcribed real recordings of Debian's
   pocketsphinx-testdata into ``data/real``;
2. transcribes the real recordings, printing each reference beside the answer and its confidence;
3. answers the built-in non-speech clips (noise, tones, hum, chords, silence): how many it
   recognises as no speech;
4. evaluates the model on a fixed spread-out subset of the test split and of the real-speech test
   split (100 utterances each; ``--limit 0`` for all), Whisper tiny.en's own decoder beside it on
   the same real-speech audio and normalisation, and on the ten real recordings, writing
   ``results/demo/latest/`` (metrics, summary, plots; git ignores it, so the checkout stays clean:
   the committed snapshot in ``results/demo/`` is written with ``--out results/demo``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harmonifuse.atomic import atomic_write_text
from harmonifuse.inference.loading import load_model
from harmonifuse.pretrained import default_model


def _prepare_real(out: Path) -> Path | None:
    """The real-speech manifest (written once), or None without pocketsphinx-testdata."""
    from harmonifuse.data.importers import pocketsphinx

    manifest = out / pocketsphinx.MANIFEST
    if manifest.is_file():
        return manifest
    if not pocketsphinx.DEFAULT_SRC.is_dir():
        print("   (not installed: apt-get install pocketsphinx-testdata)")
        return None
    return pocketsphinx.prepare(pocketsphinx.DEFAULT_SRC, out)["real"]


def _prepare_real_speech(out: Path) -> Path | None:
    """The real-speech test manifest (built once from Debian's packages), or None where it cannot be built."""
    from harmonifuse.data.importers import real_speech

    manifest = out / real_speech.MANIFESTS["test"]
    if manifest.is_file():
        return manifest
    print(f"   building it in {out} (once: two Debian packages, about 60 MB)")
    try:  # Drascula's Whisper-agreement filter (train only, 10-50 min) is skipped: dev and test are the same
        return real_speech.prepare(out, agreement=None)["test"]
    except (OSError, RuntimeError, ValueError) as error:
        print(f"   (not built: {error})")
        return None


def _limited(manifest: Path, folder: Path, limit: int) -> Path:
    """A fixed spread-out subset of ``limit`` utterances of ``manifest`` (all with 0), as a manifest in ``folder``."""
    if not limit:
        return manifest
    from harmonifuse.data.manifest import read_manifest, write_manifest
    from harmonifuse.training.loaders import spread_sample

    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder / manifest.name, spread_sample(read_manifest(manifest), limit))
    return folder / manifest.name


def _whisper_row(manifest: Path) -> dict:
    """Whisper tiny.en's own decoder (greedy, 30 s window) on ``manifest``, scored as the model is."""
    from harmonifuse.audio import load_audio
    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.metrics import asr_metrics
    from harmonifuse.evaluation.whisper_reference import WhisperReference

    utterances = [u for u in read_manifest(manifest) if u.text]
    hypotheses = WhisperReference().transcribe([load_audio(u.audio) for u in utterances])
    metrics = asr_metrics([u.text for u in utterances], hypotheses)
    return {**{k: v for k, v in metrics.items() if k in ("wer", "cer", "wer_raw")}, "n_asr": len(utterances)}


def _show_real(model, manifest: Path) -> None:
    from harmonifuse.data.manifest import read_manifest

    utterances = read_manifest(manifest)
    for utt, result in zip(utterances, model.analyze([u.audio for u in utterances], tasks=("asr",))):
        answer = "(no speech)" if result["no_speech"] else result["transcript"]
        print(f"{Path(utt.audio).name}\n  reference:  {utt.text}\n  answer:     {answer}"
              f"   (confidence {result['transcript_confidence']:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    # folders relative to where it runs (the repository's root under `make demo`), not to the package
    parser.add_argument("--corpus", default="data/synthetic", help="folder of the built-in corpus (built there once)")
    parser.add_argument("--real", default="data/real", help="folder for the manifest of the real recordings")
    parser.add_argument("--real-speech", default="data/real-speech",
                        help="folder of the real-speech corpus (built there once; '' skips it)")
    parser.add_argument("--out", default="results/demo/latest",
                        help="report folder (default results/demo/latest, ignored by git)")
    parser.add_argument("--limit", type=int, default=100,
                        help="evaluate on a fixed spread-out subset of N utterances per task, so the demo stays "
                             "within 5 minutes on 2 CPU cores without bf16 units (0: the whole split)")
    args = parser.parse_args(argv)
    start = time.time()

    from harmonifuse.data.manifest import read_manifest
    from harmonifuse.evaluation.evaluate import nonspeech_metrics
    from harmonifuse.evaluation.model_report import SCALARS, markdown_table, run_evaluation

    corpus = Path(args.corpus)
    if not (corpus / "asr_test.jsonl").is_file():
        from harmonifuse.data.synthetic import prepare

        print(f"== building the built-in synthetic corpus in {corpus} (once, a few minutes)")
        prepare(corpus)

    model_dir = args.model or default_model()
    model = load_model(model_dir)
    model.eval()
    d = model.config.decoding
    print(f"decoding: beam {d.beam_size}, CTC weight {d.ctc_weight}; SER temperature "
          f"{model.config.calibration.ser_temperature}; voice activity detection "
          f"{'on' if model.vad is not None else 'off'}")

    print("\n== real recordings (pocketsphinx-testdata: five LibriVox sentences, five card names)")
    real = _prepare_real(Path(args.real))
    if real is not None:
        _show_real(model, real)

    print("\n== non-speech clips (noise, tones, hum, clicks, chords, silence)")
    clips = nonspeech_metrics(model)
    invented = [c for c in clips["clips"] if not c["no_speech"]]
    print(f"answered as no speech: {clips['nonspeech_detected']:.3f} of {clips['n_nonspeech']}"
          + "".join(f"\n  {c['clip']}: {c['transcript']!r}, {c['emotion']}" for c in invented))

    print("\n== test-split clips (unseen voices and sentences; emotion is synthetic, prosody by rule)")
    asr_test = read_manifest(corpus / "asr_test.jsonl")
    ser_test = read_manifest(corpus / "ser_test.jsonl")
    picks = asr_test[:2] + [ser_test[i] for i in range(0, len(ser_test), max(1, len(ser_test) // 4))][:4]
    for utt, result in zip(picks, model.analyze([u.audio for u in picks])):
        truth = f"text: {utt.text}" if utt.text else f"emotion: {utt.emotion}"
        print(f"{Path(utt.audio).name}  [{truth}]\n  transcript: {result['transcript']}"
              f"  (confidence {result['transcript_confidence']:.2f})\n"
              f"  emotion:    {result['emotion']}  ({json.dumps(result['emotion_probs'])})")

    limited = Path(args.out) / "limited"
    manifests = [_limited(corpus / name, limited, args.limit) for name in ("asr_test.jsonl", "ser_test.jsonl")]
    print("\n== evaluation on the test split" + (f" ({args.limit} utterances per task, a fixed spread-out "
                                                   "subset; --limit 0 for all)" if args.limit else ""))
    log = Path(model_dir) / "log.jsonl" if model_dir else None
    summary = run_evaluation(model, manifests, Path(args.out), batch_size=8,
                             log_file=log if log and log.is_file() else None, nonspeech=clips)
    rows = {"test split": summary}
    if args.real_speech:
        print("\n== the real-speech test split (game dialogue read by actors, narrowband 11 kHz; unseen speakers)")
        speech = _prepare_real_speech(Path(args.real_speech))
        if speech is not None:
            speech = _limited(speech, limited, args.limit)
            n = len(read_manifest(speech))
            rows[f"real-speech test ({n}, narrowband)"] = run_evaluation(
                model, [speech], Path(args.out) / "real-speech", batch_size=8, progress=False)
            whisper = rows["Whisper tiny.en's own decoder, same audio"] = _whisper_row(speech)
            atomic_write_text(Path(args.out) / "real-speech" / "whisper_reference.json", json.dumps(whisper, indent=1))
    if real is not None:
        rows["real recordings (10, a smoke signal)"] = run_evaluation(model, [real], Path(args.out) / "real",
                                                                      batch_size=8, progress=False)
    print("\n| metric | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
    for key in SCALARS:
        if any(key in r for r in rows.values()):
            print(f"| {key} | " + " | ".join(f"{r[key]:.4f}" if key in r else "" for r in rows.values()) + " |")
    atomic_write_text(Path(args.out) / "nonspeech.json", json.dumps(clips, indent=1))
    if "per_speaker" in summary:
        print("\n" + markdown_table(summary["per_speaker"], "Per test voice", "speaker"))
    print(f"\nreport and plots: {Path(args.out) / 'summary.md'}   ({(time.time() - start) / 60:.1f} min)")
    if model_dir is None:
        print("note: the model was UNTRAINED (no shipped model found); train one with "
              "`harmonifuse train configs/demo.yaml`", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
