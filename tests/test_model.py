"""The assembled model on tiny seeded parts: layout, loss masking, decoding, scoring, save/load, analyze."""
import types

import numpy as np
import pytest
import torch
from decoding_oracle import hf_generate
from tiny import perturbed, tiny_harmonifuse, tiny_llama

from harmonifuse.model import HarmoniFuse
from harmonifuse.modules.llm import IGNORE_INDEX


@pytest.fixture(scope="module")
def model():
    return perturbed(tiny_harmonifuse(seed=0))


def _waves(seconds=(1.0, 0.6), seed=0):
    torch.manual_seed(seed)
    lengths = torch.tensor([int(s * 16000) for s in seconds])
    return torch.randn(len(seconds), int(lengths.max())) * 0.1, lengths


def _hidden(model, seconds=(1.0, 0.6), seed=0):
    return model.encode(*_waves(seconds, seed))


def test_loss_is_masked_to_answer_tokens(model):
    enc = _hidden(model)
    speech = model.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "ser"])
    prompts = model.prompts_for(["asr", "ser"])
    inputs = model.llm.build_inputs(speech.embeddings, speech.lengths, prompts, ["hello world", "happy"])
    for i, (answer, prompt) in enumerate(zip(["hello world", "happy"], prompts)):
        prefix, suffix = model.llm.layout(prompt)
        context = len(prefix) + int(speech.lengths[i]) + len(suffix)
        answer_ids = model.llm.answer_ids(answer)
        row = inputs.labels[i]
        assert torch.all(row[:context] == IGNORE_INDEX)
        assert row[context:context + len(answer_ids)].tolist() == answer_ids
        assert torch.all(row[context + len(answer_ids):] == IGNORE_INDEX)  # right padding
        assert int(inputs.attention_mask[i].sum()) == context + len(answer_ids)
    assert answer_ids[-1] == model.llm.eos_token_id


def test_loss_from_answer_positions_only_equals_the_loss_over_full_logits():
    model = tiny_harmonifuse(seed=0)
    enc = _hidden(model, seconds=(1.0, 0.4, 0.7))
    tasks = ["asr", "ser", "asr"]
    speech = model.speech_embeddings(enc.hidden_states, enc.lengths, tasks)
    inputs = model.llm.build_inputs(speech.embeddings, speech.lengths, model.prompts_for(tasks),
                                    ["hello world", "happy", "the lazy dog"])
    loss = model.llm(inputs)
    full = model.llm.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                           position_ids=inputs.position_ids).logits[:, :-1]
    reference = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), inputs.labels[:, 1:].reshape(-1),
                                                  ignore_index=IGNORE_INDEX)
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    projector = model.projector.mlp[0].weight
    (grad,) = torch.autograd.grad(loss, projector, retain_graph=True)
    (reference_grad,) = torch.autograd.grad(reference, projector)
    assert torch.allclose(grad, reference_grad, rtol=1e-5, atol=1e-8)


def test_layout_puts_speech_before_prompt_in_chat_template(model):
    prefix, suffix = model.llm.layout("Transcribe the audio.")
    tok = model.llm.tokenizer
    assert tok.decode(prefix) == "<|im_start|>user\n"
    assert tok.decode(suffix) == "Transcribe the audio.<|im_end|>\n<|im_start|>assistant\n"


def test_batched_generation_equals_single(model):
    enc = _hidden(model)
    speech = model.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "asr"])
    prompts = model.prompts_for(["asr", "asr"])
    batched = [model.llm.detokenize(h.tokens) for h in model.llm.decode(speech.embeddings, speech.lengths, prompts)]
    singles = [model.llm.detokenize(model.llm.decode(speech.embeddings[i:i + 1, : int(speech.lengths[i])],
                                                     speech.lengths[i:i + 1], prompts[i:i + 1])[0].tokens)
               for i in range(2)]
    assert batched == singles == hf_generate(model.llm, speech.embeddings, speech.lengths, prompts)
    assert any(text for text in batched)  # the perturbed model does say something


def test_label_scores_equal_sequence_log_likelihood(model):
    enc = _hidden(model)
    speech = model.speech_embeddings(enc.hidden_states, enc.lengths, ["ser", "ser"])
    prompts = model.prompts_for(["ser", "ser"])
    labels = model.config.tasks.emotion_labels
    scores = model.llm.score_labels(speech.embeddings, speech.lengths, prompts, labels)
    assert scores.shape == (2, len(labels))
    for i in range(2):
        for k, label in enumerate(labels):
            inputs = model.llm.build_inputs(speech.embeddings[i:i + 1, : int(speech.lengths[i])],
                                            speech.lengths[i:i + 1], prompts[i:i + 1], [label])
            n_tokens = int((inputs.labels != IGNORE_INDEX).sum())
            nll = model.llm(inputs) * n_tokens  # mean over answer tokens -> sum
            assert float(scores[i, k]) == pytest.approx(-float(nll), abs=1e-4)


def test_analyze_equals_separate_task_calls(model):
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000).astype(np.float32) * 0.1, rng.standard_normal(9000).astype(np.float32) * 0.1]
    both = model.analyze(clips)
    transcripts = model.transcribe(clips)
    emotions = model.recognize_emotion(clips)
    for result, text, (label, probs) in zip(both, transcripts, emotions):
        assert result["transcript"] == text
        assert result["emotion"] == label
        assert result["emotion_probs"] == pytest.approx(probs, abs=1e-5)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-4)


def test_layer_weights_follow_the_prompt(model):
    enc = _hidden(model)
    a = model.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "asr"], ["Transcribe the audio."] * 2)
    b = model.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "asr"], ["Write down what is said."] * 2)
    assert not torch.allclose(a.layer_weights, b.layer_weights, atol=1e-4)
    fresh = tiny_harmonifuse(seed=0)
    c = fresh.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "ser"])
    assert torch.allclose(c.layer_weights, torch.full_like(c.layer_weights, 1 / 3))


def test_save_then_load_gives_identical_outputs(tmp_path, model):
    # base models on disk, named by the config, as a real user's hub ids or folders would be
    encoder_dir, llm_dir = tmp_path / "encoder", tmp_path / "llm"
    model.encoder.model.save_pretrained(encoder_dir)
    tiny_llama(len(model.llm.tokenizer), seed=0).save_pretrained(llm_dir)
    model.llm.tokenizer.save_pretrained(llm_dir)
    model.config.encoder.source = str(encoder_dir)
    model.config.llm.source = str(llm_dir)
    saved = model.save_pretrained(tmp_path / "trained")
    assert sorted(p.name for p in saved.iterdir()) == ["config.yaml", "trained.safetensors"]
    loaded = HarmoniFuse.from_pretrained(saved).eval()
    enc = _hidden(model)
    batch = types.SimpleNamespace(hidden_states=enc.hidden_states, frame_lengths=enc.lengths,
                                  tasks=["asr", "ser"], targets=["hello world", "sad"])
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)
    rng = np.random.default_rng(1)
    clip = rng.standard_normal(12000).astype(np.float32) * 0.1
    assert model.analyze(clip) == loaded.analyze(clip)


def test_loading_into_a_different_configuration_fails_clearly(tmp_path, model):
    other = tiny_harmonifuse(seed=0, gate={"mode": "none"})
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="does not match this model's configuration"):
        other.load_trained(tmp_path / "m" / "trained.safetensors")


def test_unknown_task_is_rejected(model):
    with pytest.raises(ValueError, match="unknown task"):
        model.task_ids(["translate"])


def test_a_few_steps_learn_a_memorisable_pair():
    """Same task and prompt, different answers: only the speech can tell them apart."""
    model = tiny_harmonifuse(seed=1).train()
    enc = _hidden(model, seed=3)
    batch = types.SimpleNamespace(hidden_states=enc.hidden_states, frame_lengths=enc.lengths,
                                  tasks=["asr", "asr"], targets=["hello world", "the lazy dog"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(batch).loss
        first = first if first is not None else float(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.2 * first
    model.eval()
    assert model.transcribe([(w[: int(n)].numpy(), 16000) for w, n in zip(*_waves(seed=3))]) == list(batch.targets)


def test_hidden_state_prompt_vectors_are_cached_and_differ_per_prompt():
    model = tiny_harmonifuse(seed=0, prompt={"vector": "hidden_state"})
    vectors = model.prompt_encoder(["Transcribe the audio.", "Write down what is said.", "Transcribe the audio."])
    assert vectors.shape == (3, 32)
    assert torch.equal(vectors[0], vectors[2]) and not torch.allclose(vectors[0], vectors[1])
    # the base LLM (adapters off) computes it, so training LoRA does not invalidate the cache
    with torch.no_grad():
        for name, p in model.llm.model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    fresh = type(model.prompt_encoder)(model.llm).compute("Transcribe the audio.")
    assert torch.allclose(fresh, vectors[0], atol=1e-5)


def test_analyze_rejects_bad_audio_with_the_file_named(model, tmp_path):
    import soundfile as sf

    from harmonifuse.audio import AudioError

    with pytest.raises(AudioError, match="missing.wav"):
        model.analyze(str(tmp_path / "missing.wav"))
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(AudioError, match="text.wav"):
        model.analyze(str(tmp_path / "text.wav"))
    sf.write(tmp_path / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav"):
        model.analyze(str(tmp_path / "nan.wav"))
    model.config.encoder.max_seconds = 1.0
    try:  # longer than the window: cut at pauses, never refused (noise holds no speech segment)
        sf.write(tmp_path / "long.wav", np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1,
                 16000)
        long = model.analyze(str(tmp_path / "long.wav"))
        assert long["no_speech"] is True and long["segments"] == [] and long["duration"] == 2.0
    finally:
        model.config.encoder.max_seconds = 30.0


def test_stereo_and_8khz_are_converted_like_mono_16k(model, tmp_path):
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(2)
    mono = (rng.standard_normal(16000) * 0.1).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([mono, mono], axis=1), 16000, subtype="FLOAT")
    assert model.analyze(str(tmp_path / "stereo.wav")) == model.analyze(mono)
    narrow = soxr.resample(mono, 16000, 8000).astype(np.float32)
    sf.write(tmp_path / "8k.wav", narrow, 8000, subtype="FLOAT")
    assert model.analyze(str(tmp_path / "8k.wav")) == model.analyze((narrow, 8000))


def test_matched_embedding_norm_puts_speech_at_the_scale_of_the_llm_token_embeddings():
    model = tiny_harmonifuse(seed=0, projector={"match_embedding_norm": True})
    table = model.llm.model.get_input_embeddings().weight.detach()
    assert model.projector.output_rms == pytest.approx(float(table.pow(2).mean().sqrt()), rel=1e-6)
    enc = _hidden(model, seed=1)
    with torch.no_grad():
        speech = model.speech_embeddings(enc.hidden_states, enc.lengths, ["asr", "ser"])
    rms = speech.embeddings.pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, model.projector.output_rms), rtol=1e-4)
    # a fixed scale: no new trained parameters, so saved models stay loadable either way
    assert set(model.trained_state_dict()) == set(tiny_harmonifuse(seed=0).trained_state_dict())


def test_auxiliary_ctc_adds_to_the_loss_of_asr_items_in_training_only():
    from ctc_oracle import embedding_ctc_loss

    model = tiny_harmonifuse(seed=0, ctc={"loss_weight": 0.5}).train()
    enc = _hidden(model, seed=1)
    batch = types.SimpleNamespace(hidden_states=enc.hidden_states, frame_lengths=enc.lengths,
                                  tasks=["asr", "ser"], targets=["hello world", "sad"])
    with torch.no_grad():
        total = model(batch).loss
        speech = model.speech_embeddings(enc.hidden_states, enc.lengths, batch.tasks)
        inputs = model.llm.build_inputs(speech.embeddings, speech.lengths, model.prompts_for(batch.tasks),
                                        batch.targets)
        ctc = embedding_ctc_loss(speech.embeddings[:1], speech.lengths[:1], [model.llm.tokenize("hello world")],
                                 model.llm.model.get_input_embeddings().weight, model.llm.ctc_blank_id)
        assert float(total) == pytest.approx(float(model.llm(inputs) + 0.5 * ctc), rel=1e-5)
        assert float(ctc) > 0
        model.eval()
        assert float(model(batch).loss) == pytest.approx(float(model.llm(inputs)), rel=1e-5)
    assert model.llm.ctc_blank_id not in model.llm.tokenize("hello world")


def test_a_trainable_ssl_encoder_returns_every_hidden_state_in_training_despite_layerdrop():
    from tiny import tiny_wavlm_config

    from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder

    config = tiny_wavlm_config()
    config.layerdrop = 1.0  # transformers would skip every layer after the first in training
    torch.manual_seed(0)
    encoder = SSLSpeechEncoder.from_config(config, trainable=True).train()
    waveforms = torch.randn(2, 1600)
    out = encoder(waveforms, torch.tensor([1600, 1200]))
    assert out.hidden_states.shape[0] == config.num_hidden_layers + 1
    out.hidden_states[-1].sum().backward()
    assert encoder.model.encoder.layers[-1].feed_forward.output_dense.weight.grad is not None
