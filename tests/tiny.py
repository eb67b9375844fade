"""Tiny seeded models for fast tests: a WavLM-style encoder, a Llama LM and a byte-level BPE tokenizer."""
from __future__ import annotations

import torch

from harmonifuse.config import ModelConfig, from_dict
from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder
from harmonifuse.modules.llm import SpeechLLM

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "transcribe the audio", "what emotion does the speaker express answer with one word",
    "neutral happy sad angry", "the quick brown fox jumps over the lazy dog", "hello world",
    "write down what is said", "which feeling is in this voice",
] * 20


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def tiny_wavlm_config():
    from transformers import WavLMConfig

    return WavLMConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=8,
                       num_conv_pos_embedding_groups=2, num_buckets=16, max_bucket_distance=32,
                       do_stable_layer_norm=True, feat_extract_norm="layer")


def tiny_encoder(seed: int = 0) -> SSLSpeechEncoder:
    torch.manual_seed(seed)
    return SSLSpeechEncoder.from_config(tiny_wavlm_config(), name="tiny-wavlm")


PLAIN_MODEL = {
    "encoder": {"trainable": False}, "feature_masking": {"time_masks": 0, "channel_masks": 0},
    "projector": {"match_embedding_norm": False},
    "ctc": {"loss_weight": 0.0, "tasks": ["asr"], "scale": 1.0, "learned_blank": False},
    "llm": {"attention": "sdpa"}, "tasks": {"train_prompts": {}}, "decoding": {"beam_size": 1, "ctc_weight": 0.0},
}
"""The tiny models' plain architecture: none of the shipped recipe's extras (the config's defaults),
so that each test turns on what it tests: a frozen encoder, no feature masking, no embedding-CTC
loss (a CTC head scoring ASR, blank from the vocabulary, scale 1), one prompt per task, greedy decoding."""


def plain_model(**sections) -> dict:
    """PLAIN_MODEL with ``sections`` merged into it, section by section."""
    import copy

    data = copy.deepcopy(PLAIN_MODEL)
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return data


def tiny_model_config(**sections) -> ModelConfig:
    # no voice activity detection: the tiny models read random noise
    data = plain_model(projector={"stack": 2, "hidden_size": 24},
                       llm={"lora_rank": 4, "lora_alpha": 8.0, "max_new_tokens": 8}, vad={"enabled": False})
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return from_dict(ModelConfig, data)


def tiny_harmonifuse(seed: int = 0, **sections):
    from harmonifuse.model import HarmoniFuse

    tokenizer = tiny_tokenizer()
    config = tiny_model_config(**sections)
    llm = SpeechLLM.wrap(tiny_llama(len(tokenizer), seed), tokenizer, lora_rank=config.llm.lora_rank,
                         lora_alpha=config.llm.lora_alpha, lora_targets=config.llm.lora_targets,
                         max_new_tokens=config.llm.max_new_tokens)
    torch.manual_seed(seed)
    return HarmoniFuse.from_parts(config, tiny_encoder(seed), llm)


def perturbed(model, seed: int = 5, scale: float = 0.3):
    """``model`` with its trained parts moved off their zero/identity start (LoRA B included), so every
    component matters; in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * scale)
    return model.eval()


# -- on-disk fixtures for end-to-end runs (subprocesses build the model from these folders) ----------

ASR_TARGETS = ["hello world", "the lazy dog", "quick brown fox", "write down what", "over the dog", "hello fox"]
SER_TARGETS = ["neutral", "happy", "sad", "angry"]


def write_tiny_assets(root):
    """Tiny encoder and LLM (+ tokenizer) saved as transformers folders; returns their paths."""
    from pathlib import Path

    root = Path(root)
    tokenizer = tiny_tokenizer()
    tiny_encoder(0).model.save_pretrained(root / "encoder")
    tiny_llama(len(tokenizer), 0).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    return root / "encoder", root / "llm"


def write_tiny_corpus(root, per_task: int = 8, seed: int = 0):
    """Distinct noise-like clips (0.3-0.6 s) with ASR and SER labels; train/dev/test manifests."""
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    from harmonifuse.data.manifest import Utterance, write_manifest

    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for task, targets in (("asr", ASR_TARGETS), ("ser", SER_TARGETS)):
        utts = []
        for i in range(per_task):
            n = int(rng.integers(4800, 9600))
            t = np.arange(n) / 16000
            wave = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.05 * rng.standard_normal(n)
            path = root / "audio" / f"{task}_{i}.wav"
            sf.write(path, wave.astype(np.float32), 16000)
            label = targets[i % len(targets)]
            utts.append(Utterance(id=f"{task}_{i}", audio=str(path), duration=n / 16000, corpus="tiny",
                                  speaker=f"spk{i % 2}", text=label if task == "asr" else None,
                                  emotion=label if task == "ser" else None))
        splits[task] = utts
        for split in ("train", "dev", "test"):
            write_manifest(root / f"{task}_{split}.jsonl", utts)
    return root


def write_tiny_run_config(root, **sections):
    """A run config (YAML) training the tiny model on the tiny corpus; returns its path."""
    from pathlib import Path

    import yaml

    root = Path(root)
    encoder_dir, llm_dir = write_tiny_assets(root / "assets")
    write_tiny_corpus(root / "corpus")
    config = {
        "model": plain_model(encoder={"source": str(encoder_dir)}, llm={"source": str(llm_dir), "lora_rank": 4,
                                                                   "lora_alpha": 8.0, "max_new_tokens": 8},
                        projector={"stack": 2, "hidden_size": 24}, vad={"enabled": False}),
        "data": {"root": str(root / "corpus"), "build_synthetic": False, "batch_size": 4,
                 "feature_cache": str(root / "features")},
        "optim": {"lr": 1e-2, "lora_lr": 1e-2, "warmup_steps": 0, "schedule": "constant"},
        "train": {"output_dir": str(root / "run"), "max_steps": 40, "eval_every": 20, "save_every": 10,
                  "precision": "fp32", "threads": 1, "log_every": 1},
    }
    for key, value in sections.items():
        if key == "model":  # each model section merged into the tiny one's (the plain architecture stays)
            for name, section in value.items():
                if isinstance(section, dict):
                    config["model"].setdefault(name, {}).update(section)
                else:
                    config["model"][name] = section
        else:
            config.setdefault(key, {}).update(value)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class LoudIsSpeechVAD:
    """A voice activity detector for the tiny models' noise input: speech wherever the signal is loud
    (the real detector finds none in noise). Same interface as harmonifuse.modules.vad.SileroVAD."""

    threshold, min_speech_seconds = 0.5, 0.25

    def speech_probabilities(self, waveforms):
        import numpy as np

        out = []
        for w in waveforms:
            n = max(1, -(-len(w) // 512))
            padded = np.zeros(n * 512, dtype=np.float32)
            padded[: len(w)] = w
            out.append((np.abs(padded.reshape(n, 512)).mean(1) > 0.05).astype(np.float32) * 0.98 + 0.01)
        return out

    def has_speech(self, waveforms):
        return [float((p > 0.5).sum()) * 0.032 >= 0.25 for p in self.speech_probabilities(waveforms)]

