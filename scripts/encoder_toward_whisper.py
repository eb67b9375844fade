"""A model whose fine-tuned Whisper encoder is moved back toward Whisper's own weights (WiSE-FT of
the encoder alone): encoder = a * Whisper's + (1 - a) * the model's; every other part unchanged.

    python scripts/encoder_toward_whisper.py harmonifuse-demo 0.3 --out runs/encoder-30
    python scripts/score_candidates.py --out results/candidates harmonifuse-demo runs/encoder-30

A measurement of how much of the encoder's drift from Whisper costs on real speech (the training
log's "averaging the two fine-tunes"), not a recipe: the projector and the LoRA were trained on the
moved encoder.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder with a fine-tuned Whisper encoder, or the shipped model's name")
    parser.add_argument("share", type=float, help="Whisper's share a, from 0 (the model's encoder) to 1 (Whisper's)")
    parser.add_argument("--out", required=True, help="new folder for the model")
    args = parser.parse_args(argv)
    if not 0.0 <= args.share <= 1.0:
        parser.error(f"share {args.share}: give a number from 0 to 1")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists: choose a new --out folder")

    from safetensors.torch import load_file, save_file
    from transformers import WhisperForConditionalGeneration

    from harmonifuse.assets import whisper_tiny_en_dir
    from harmonifuse.pretrained import CONFIG_NAME, WEIGHTS_NAME, find_model_folder

    from harmonifuse.evaluation.whisper_reference import ENCODER_PREFIX as prefix
    folder = find_model_folder(args.model)
    if folder is None:
        parser.error(f"{args.model}: not a model folder")
    whisper = WhisperForConditionalGeneration.from_pretrained(whisper_tiny_en_dir()).model.encoder.state_dict()
    trained = load_file(folder / WEIGHTS_NAME)
    a = args.share
    moved = {name: (a * whisper[name[len(prefix):]].double() + (1 - a) * tensor.double()).to(tensor.dtype)
             for name, tensor in trained.items() if name.startswith(prefix) and name[len(prefix):] in whisper}
    if len(moved) != len(whisper):
        parser.error(f"{folder} holds {len(moved)} of Whisper tiny.en's {len(whisper)} encoder tensors: "
                     "it was not trained with Whisper tiny.en's encoder unfrozen")
    out.mkdir(parents=True)
    save_file({**trained, **moved}, out / WEIGHTS_NAME)
    shutil.copy(folder / CONFIG_NAME, out / CONFIG_NAME)
    print(f"{out}: {len(moved)} encoder tensors {args.share:.0%} of the way back to Whisper's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
