"""What large base models need, checked on tiny seeded ones: CTC over the vocabulary in chunks,
label scoring that keeps only the logits it reads, greedy decoding that ignores the LLM's own
sampling settings, the prompt layout under real chat templates, and the memory switches."""
import pytest
import torch
from decoding_oracle import hf_generate
from tiny import perturbed, tiny_harmonifuse, tiny_llama, tiny_tokenizer

from harmonifuse.decoding import CTCScores
from harmonifuse.modules.ctc import EmbeddingCTC
from harmonifuse.modules.llm import SpeechLLM

# -- CTC over the vocabulary in chunks ---------------------------------------------------------------

def _ctc_case(seed: int = 0):
    """speech (3, 9, 32), lengths, targets (item 2's cannot fit: 4 tokens + 1 repeat > 4 positions),
    a (V, 32) table with a gradient, and the blank."""
    torch.manual_seed(seed)
    table = (torch.randn(301, 32) * 0.5).requires_grad_()
    speech = (torch.randn(3, 9, 32) * 0.5).requires_grad_()
    lengths = torch.tensor([9, 7, 4])
    targets = [[5, 17, 17, 200], [300, 3], [8, 8, 9, 10]]
    return speech, lengths, targets, table, 0


@pytest.mark.parametrize("learned_blank", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_ctc_equals_the_whole_table_in_loss_and_gradients(chunk, learned_blank):
    speech, lengths, targets, table, blank = _ctc_case()
    results = []
    for vocab_chunk in (0, chunk):
        torch.manual_seed(1)
        head = EmbeddingCTC(2.5, learn_scale=True, blank_size=32 if learned_blank else None, vocab_chunk=vocab_chunk)
        if learned_blank:
            with torch.no_grad():
                head.blank_vector.normal_()
        loss = head(speech, lengths, targets, table, blank)
        params = [speech, table] + list(head.parameters())
        results.append((loss, torch.autograd.grad(loss, params)))
    (full, full_grads), (chunked, chunked_grads) = results
    assert torch.isfinite(full) and full > 0
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked_grads, full_grads):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_chunked_ctc_never_builds_the_whole_logits():
    """Forward and backward of the chunked loss: no tensor as large as (B, N, V) is ever made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    torch.manual_seed(0)
    B, N, V, H = 2, 20, 5000, 8
    table = torch.randn(V, H)  # frozen, as the LLM's
    speech = torch.randn(B, N, H, requires_grad=True)
    head = EmbeddingCTC(1.0, learn_scale=True, vocab_chunk=256)
    with Largest():
        loss = head(speech, torch.tensor([N, 15]), [[4, 4000, 17], [2500]], table, 0)
        loss.backward()
    assert speech.grad.abs().sum() > 0
    assert Largest.numel <= max(B * N * 256, V * H) < B * N * V


@pytest.mark.parametrize("learned_blank", [False, True])
def test_chunked_ctc_scores_decodes_and_log_posteriors_equal_the_whole_table(learned_blank):
    speech, lengths, _, table, blank = _ctc_case(3)
    speech, table = speech.detach(), table.detach()
    full = EmbeddingCTC(1.7, blank_size=32 if learned_blank else None)
    chunked = EmbeddingCTC(1.7, blank_size=32 if learned_blank else None, vocab_chunk=10)
    if learned_blank:
        chunked.blank_vector.data = full.blank_vector.data = torch.randn(32)
    log_probs, full_blank = full.log_probs(speech, table, blank)
    chunked_log_probs, chunked_blank = chunked.log_probs(speech, table, blank)
    assert chunked_blank == full_blank
    torch.testing.assert_close(chunked_log_probs, log_probs)
    candidates = [[4], [5, 6, 6], [7, 8, 9, 10, 11]]  # the last cannot fit in item 2's 4 positions
    nll = full.candidate_nll(speech, lengths, candidates, table, blank)
    assert torch.isinf(nll[2, 2])
    torch.testing.assert_close(chunked.candidate_nll(speech, lengths, candidates, table, blank), nll)
    assert chunked.decode(speech, lengths, table, blank) == full.decode(speech, lengths, table, blank)
    # the columns on demand (what the beam search reads), without the (B, N, C) tensor
    lazy, lazy_blank = chunked.posteriors(speech, table, blank)
    assert lazy_blank == full_blank and lazy.shape == tuple(log_probs.shape)
    index = torch.tensor([[full_blank, 0, 300, 7], [5, full_blank, 5, 299], [1, 2, 3, full_blank]])
    torch.testing.assert_close(lazy.take(index), log_probs.gather(2, index[:, None, :].expand(-1, 9, -1)))
    torch.testing.assert_close(lazy.repeat_interleave(2).take(index.repeat_interleave(2, 0)),
                               log_probs.repeat_interleave(2, 0).gather(2, index.repeat_interleave(2, 0)[:, None, :]
                                                                        .expand(-1, 9, -1)))


def test_chunked_ctc_keeps_the_joint_beam_search_and_training_loss_of_the_model():
    """The model with ``ctc.vocab_chunk``: the same CTC training loss and gradients, and the
    same joint CTC/LLM hypotheses (the prefix scorer reads the chunked log-posteriors)."""
    models = [tiny_harmonifuse(seed=0, ctc={"loss_weight": 0.5, "vocab_chunk": chunk}) for chunk in (0, 37)]
    assert models[1].ctc.vocab_chunk == 37
    torch.manual_seed(5)
    noise = {n: torch.randn_like(p) * 0.3 for n, p in models[0].named_parameters() if p.requires_grad}
    torch.manual_seed(1)
    waves, lengths = torch.randn(3, 16000) * 0.1, torch.tensor([16000, 9000, 12000])
    outputs = []
    for model in models:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in noise:
                    p.add_(noise[n])
        model.eval()
        encoded = model.encode(waves, lengths)
        speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * 3)
        loss, _ = model._ctc_loss(speech, ["asr"] * 3, ["hello world", "the lazy dog", "quick brown fox"])
        grads = torch.autograd.grad(loss, list(model.projector.parameters()))
        with torch.no_grad():
            speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * 3)
            log_probs, blank = model.ctc_log_probs(speech)
            hyps = model.llm.decode(speech.embeddings, speech.lengths, model.prompts_for(["asr"] * 3), beam_size=3,
                                    ctc_weight=0.5, ctc=CTCScores(log_probs, speech.lengths, blank))
        outputs.append((loss, grads, hyps))
    (loss, grads, hyps), (loss_c, grads_c, hyps_c) = outputs
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(grads_c, grads):
        # the untrained model's loss is ~200 nats per token over 400 positions: float32 sums in another
        # order differ in the 5th digit, so compare each gradient as a whole
        assert b.norm() > 0 and (a - b).norm() <= 1e-4 * b.norm()
    assert [h.tokens for h in hyps_c] == [h.tokens for h in hyps]
    assert [h.score for h in hyps_c] == pytest.approx([h.score for h in hyps], abs=1e-4)


@pytest.mark.parametrize("learned_blank", [False, True])
def test_under_bf16_autocast_the_whole_table_ctc_is_float32_as_the_chunked_one(learned_blank):
    """The chunked CTC computes its logits in float32 whatever the autocast; the whole-table one ran its
    (B, N, V) matmul in bf16 under autocast, so one config gave two different losses (and gradients)."""
    from harmonifuse.modules.ctc import EmbeddingCTC

    torch.manual_seed(0)
    speech, table = torch.randn(2, 12, 16), torch.randn(300, 16)
    targets, lengths = [[5, 9, 9, 40], [7, 250]], torch.tensor([12, 9])
    heads = [EmbeddingCTC(3.0, blank_size=16 if learned_blank else None, vocab_chunk=chunk) for chunk in (0, 37)]
    if learned_blank:
        heads[1].blank_vector.data.copy_(heads[0].blank_vector.data.normal_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        whole, chunked = (head(speech, lengths, targets, table, blank=0) for head in heads)
        greedy = [head.decode(speech, lengths, table, blank=0) for head in heads]
    assert whole.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(whole, chunked, rtol=1e-5, atol=1e-5)  # bf16 logits: off by ~1e-2
    assert greedy[0] == greedy[1]


def test_the_ctc_vocabulary_is_chunked_by_default_above_64k_tokens():
    """A 128-152k vocabulary's whole float32 (B, N, V) tables take gigabytes per batch."""
    from harmonifuse.config import ModelConfig, from_dict
    from harmonifuse.modules.ctc import resolve_vocab_chunk

    assert from_dict(ModelConfig, {}, prefix="model").ctc.vocab_chunk == "auto"
    assert resolve_vocab_chunk("auto", 49152) == 0  # SmolLM2: the whole table, fastest
    assert resolve_vocab_chunk("auto", 128256) == resolve_vocab_chunk("auto", 152064) == 8192
    assert resolve_vocab_chunk(0, 152064) == 0 and resolve_vocab_chunk(37, 300) == 37  # a number: as given
    assert tiny_harmonifuse().ctc.vocab_chunk == 0  # the tiny tokenizer's 300 tokens


@pytest.mark.parametrize("learned_blank", [False, True])
def test_transcripts_decoded_with_ctc_columns_on_demand_equal_the_whole_posteriors(learned_blank):
    """analyze with ``ctc.vocab_chunk``: the joint beam search reads CTC columns on demand
    (CTCPosteriors) and answers as with the whole (B, N, V) log-posteriors."""
    sections = dict(decoding={"beam_size": 3, "ctc_weight": 0.5}, ctc={"learned_blank": learned_blank})
    answers = []
    for chunk in (0, 37):
        chunked = {**sections, "ctc": {**sections["ctc"], "vocab_chunk": chunk}}
        model = perturbed(tiny_harmonifuse(**chunked))
        torch.manual_seed(1)
        encoded = model.encode(torch.randn(3, 16000) * 0.1, torch.tensor([16000, 9000, 12000]))
        answers.append(model.analyze_hidden(encoded.hidden_states, encoded.lengths, tasks=("asr",)))
    assert [a["transcript"] for a in answers[1]] == [a["transcript"] for a in answers[0]]
    assert [a["transcript_confidence"] for a in answers[1]] == pytest.approx(
        [a["transcript_confidence"] for a in answers[0]], abs=1e-4)


# -- label scoring keeps only the logits it reads ---------------------------------------------------

def test_label_scores_equal_full_rows_with_all_logits_and_keep_only_the_needed_ones():
    """Every label's log-probability equals the sum over its tokens (and eos) of log-softmax of full
    logits of a whole row (speech, prompt, label) without logits_to_keep; the scoring itself projects
    only the positions that predict a label token onto the vocabulary."""
    from harmonifuse.modules.llm import IGNORE_INDEX

    model = perturbed(tiny_harmonifuse())
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 7000])
    encoded = model.encode(torch.randn(2, 16000) * 0.1, lengths)
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["ser"] * 2)
    prompts = model.prompts_for(["ser"] * 2)
    labels = ["neutral", "happy", "sad", "angry", "the quick brown fox"]  # several tokens each (+ eos)
    widths = [len(model.llm.answer_ids(label)) for label in labels]
    assert len(set(widths)) > 1 and min(widths) >= 2
    shapes = []
    head = model.llm.model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        scores = model.llm.score_labels(speech.embeddings, speech.lengths, prompts, labels)
    finally:
        hook.remove()
    V = head.weight.shape[0]
    assert shapes == [(2, 1, V), (2 * len(labels), max(widths) - 1, V)]
    for i in range(2):
        for k, label in enumerate(labels):
            inputs = model.llm.build_inputs(speech.embeddings[i:i + 1, : int(speech.lengths[i])],
                                            speech.lengths[i:i + 1], prompts[i:i + 1], [label])
            with torch.no_grad():
                logits = model.llm.model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                                         position_ids=inputs.position_ids).logits.float()  # (1, T, V)
            targets = inputs.labels[0, 1:]
            answer = targets != IGNORE_INDEX
            logprobs = logits[0, :-1].log_softmax(-1)[answer].gather(-1, targets[answer, None])
            assert float(scores[i, k]) == pytest.approx(float(logprobs.sum()), abs=1e-4)


# -- greedy decoding ignores the base model's generation settings -----------------------------------

def _model_with_sampling_defaults(**llm_section):
    """The tiny model whose LLM ships an instruct model's generation settings (sampling, a repetition
    penalty, no repeated bigrams), its trained parts perturbed."""
    from tiny import tiny_encoder, tiny_model_config

    from harmonifuse.model import HarmoniFuse

    tokenizer = tiny_tokenizer()
    llama = tiny_llama(len(tokenizer), 0)
    g = llama.generation_config
    g.do_sample, g.temperature, g.top_p, g.top_k = True, 0.7, 0.8, 20
    g.repetition_penalty, g.no_repeat_ngram_size = 1.5, 2
    config = tiny_model_config(llm=llm_section)
    llm = SpeechLLM.wrap(llama, tokenizer, lora_rank=4, lora_alpha=8.0, max_new_tokens=12)
    torch.manual_seed(0)
    model = HarmoniFuse.from_parts(config, tiny_encoder(0), llm)
    return perturbed(model)


def _argmax_loop(llm, inputs, steps: int) -> list[list[int]]:
    """The plain greedy reference: the whole sequence again at every step, argmax, until eos."""
    out = []
    for i in range(inputs.inputs_embeds.shape[0]):
        keep = inputs.attention_mask[i].bool()
        embeds, tokens = inputs.inputs_embeds[i, keep][None], []
        for _ in range(steps):
            with torch.no_grad():
                token = int(llm.model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == llm.eos_token_id:
                break
            tokens.append(token)
            embeds = torch.cat([embeds, llm.embed([token])[None]], dim=1)
        out.append(tokens)
    return out


def _speech(model, n: int = 3):
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 9000, 12000][:n])
    encoded = model.encode(torch.randn(n, 16000) * 0.1, lengths)
    return model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * n), model.prompts_for(["asr"] * n)


def test_greedy_decoding_ignores_the_llms_sampling_and_repetition_settings():
    model = _model_with_sampling_defaults()
    llm = model.llm
    assert llm.base_generation_config.repetition_penalty == 1.5 and llm.base_generation_config.do_sample
    speech, prompts = _speech(model)
    reference = _argmax_loop(llm, llm.build_inputs(speech.embeddings, speech.lengths, prompts), 12)
    # the settings would matter: some greedy answer repeats a token (penalised) or a bigram (banned)
    assert any(len(set(row)) < len(row) for row in reference)
    torch.manual_seed(123)  # were it sampling, another seed would change the answer
    assert [h.tokens for h in llm.decode(speech.embeddings, speech.lengths, prompts, max_new_tokens=12,
                                         max_tokens_per_position=None)] == reference
    for seed in (0, 1):
        torch.manual_seed(seed)
        generated = hf_generate(llm, speech.embeddings, speech.lengths, prompts, max_new_tokens=12)
        assert generated == [llm.detokenize(row) for row in reference]


def test_a_repetition_penalty_applies_only_when_the_config_asks_for_it():
    """model.llm.repetition_penalty: our beam-search decoding and transformers' generate agree (batched,
    left padded: the oracle passes its own penalty processor, see tests/decoding_oracle.py's
    hf_generate), and the answer differs from the plain argmax."""
    model = _model_with_sampling_defaults(repetition_penalty=1.5)
    llm = model.llm
    assert llm.repetition_penalty == 1.5
    speech, prompts = _speech(model)
    plain = _argmax_loop(llm, llm.build_inputs(speech.embeddings, speech.lengths, prompts), 12)
    ours = [h.tokens for h in llm.decode(speech.embeddings, speech.lengths, prompts, max_new_tokens=12,
                                         max_tokens_per_position=None)]
    theirs = hf_generate(llm, speech.embeddings, speech.lengths, prompts, max_new_tokens=12)
    assert [llm.detokenize(row) for row in ours] == theirs
    assert ours != plain


# -- the prompt layout under the chat templates of Llama 3.x, Qwen2.5 and SmolLM2 -------------------

LLAMA_PREFIX = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
LLAMA_SUFFIX = "Transcribe the audio.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
CHATML_SUFFIX = "Transcribe the audio.<|im_end|>\n<|im_start|>assistant\n"
EXPECTED_LAYOUTS = {
    "llama-3.1": (LLAMA_PREFIX, LLAMA_SUFFIX),
    "llama-3.2": (LLAMA_PREFIX, LLAMA_SUFFIX),
    "qwen2.5": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\n", CHATML_SUFFIX),
    "smollm2": ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\n", CHATML_SUFFIX),
}


class _FrozenClock:
    """Stands in for datetime in transformers' chat-template helpers: strftime_now says ``day``."""

    def __init__(self, day):
        self.day = day

    def now(self):
        return self.day


@pytest.mark.parametrize("family", sorted(EXPECTED_LAYOUTS))
def test_chat_template_layouts_are_date_free_with_one_bos(family, monkeypatch):
    import datetime

    from chat_templates import family_tokenizer
    from transformers.utils import chat_template_utils

    tokenizer = family_tokenizer(family)
    layouts, rendered = [], []
    for day in (datetime.datetime(2031, 1, 1), datetime.datetime(2032, 7, 15)):  # two calendar days
        monkeypatch.setattr(chat_template_utils, "datetime", _FrozenClock(day))
        llm = SpeechLLM.wrap(tiny_llama(len(tokenizer)), tokenizer, lora_rank=0)
        layouts.append(llm.layout("Transcribe the audio."))
        rendered.append(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                      add_generation_prompt=True))
    if family == "llama-3.2":  # left to itself, the template writes the day into the prefix
        assert "Today Date: 01 Jan 2031" in rendered[0] and "Today Date: 15 Jul 2032" in rendered[1]
    prefix, suffix = layouts[0]
    assert layouts[1] == layouts[0]
    assert tokenizer.decode(prefix) == EXPECTED_LAYOUTS[family][0]
    assert tokenizer.decode(suffix) == EXPECTED_LAYOUTS[family][1]
    bos = tokenizer.bos_token_id
    if family.startswith("llama"):  # the tokenizer adds a BOS to every text; the template renders one too
        assert tokenizer("a")["input_ids"][0] == bos
        assert prefix[0] == bos and prefix.count(bos) == 1
    else:  # no BOS of their own: the prefix is what the template renders, nothing added
        assert tokenizer("a")["input_ids"][0] != bos
        assert prefix == tokenizer(EXPECTED_LAYOUTS[family][0], add_special_tokens=False)["input_ids"]
    assert llm.answer_ids("hello")[-1] == tokenizer.eos_token_id
    assert llm.pad_token_id == (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    assert llm.ctc_blank_id in tokenizer.all_special_ids and llm.ctc_blank_id != tokenizer.eos_token_id


@pytest.mark.parametrize("family", ["llama-3.2", "qwen2.5"])
def test_chat_template_models_decode_a_padded_batch_as_single_items(family):
    """Left padding with each family's pad (Llama: none, so eos) changes no answer; generate agrees."""
    from chat_templates import family_tokenizer
    from tiny import tiny_encoder, tiny_model_config

    from harmonifuse.model import HarmoniFuse

    tokenizer = family_tokenizer(family)
    llm = SpeechLLM.wrap(tiny_llama(len(tokenizer)), tokenizer, lora_rank=4, lora_alpha=8.0, max_new_tokens=8)
    torch.manual_seed(0)
    model = HarmoniFuse.from_parts(tiny_model_config(), tiny_encoder(0), llm)
    perturbed(model)
    speech, prompts = _speech(model)
    batched = [h.tokens for h in llm.decode(speech.embeddings, speech.lengths, prompts)]
    singles = [llm.decode(speech.embeddings[i:i + 1, : int(speech.lengths[i])], speech.lengths[i:i + 1],
                          prompts[i:i + 1])[0].tokens for i in range(3)]
    assert batched == singles
    assert hf_generate(llm, speech.embeddings, speech.lengths, prompts) == [llm.detokenize(t) for t in batched]


# -- memory for large models: a bfloat16 frozen LLM, checkpointing that reaches the encoder ------------

def _batch(tasks=("asr", "ser"), targets=("hello world", "happy"), seed=1):
    from types import SimpleNamespace

    torch.manual_seed(seed)
    return SimpleNamespace(waveforms=torch.randn(2, 12000) * 0.1, wave_lengths=torch.tensor([12000, 8000]),
                           tasks=list(tasks), targets=list(targets), prompts=None, hidden_states=None)


def test_the_frozen_llm_loads_in_bfloat16_when_asked_and_the_trained_parts_stay_float32(tmp_path, monkeypatch):
    from tiny import tiny_model_config, write_tiny_assets

    from harmonifuse.model import HarmoniFuse
    from harmonifuse.modules.llm import resolve_frozen_dtype

    assert resolve_frozen_dtype("auto") == torch.float32  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_frozen_dtype("auto") == torch.bfloat16  # Ampere: native bf16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert resolve_frozen_dtype("auto") == torch.float32  # pre-Ampere: bf16 only emulated
    monkeypatch.undo()
    encoder_dir, llm_dir = write_tiny_assets(tmp_path)
    models = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_model_config(encoder={"source": str(encoder_dir)},
                                   llm={"source": str(llm_dir), "frozen_dtype": dtype})
        models[dtype] = HarmoniFuse.build(config)
    model = models["bfloat16"]
    frozen = [p for p in model.llm.model.parameters() if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in models["float32"].llm.model.parameters()} == {torch.float32}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and {p.dtype for p in trained.values()} == {torch.float32}
    # a training step without autocast: bf16 base, float32 adapters and projector, float32 gradients
    model.train()
    out = model(_batch())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in trained.items():
        if "lora_B" in name or name.startswith("projector."):
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
    reference = models["float32"].train()(_batch())  # the same model within bf16 rounding
    assert float(out.loss) == pytest.approx(float(reference.loss), rel=0.05)


def test_gradient_checkpointing_reaches_a_trainable_encoder_and_keeps_the_gradients():
    from tiny import tiny_model_config, tiny_wavlm_config
    from transformers.modeling_layers import GradientCheckpointingLayer

    from harmonifuse.model import HarmoniFuse
    from harmonifuse.modules.encoders.ssl import SSLSpeechEncoder

    def build(trainable):
        tokenizer = tiny_tokenizer()
        llm = SpeechLLM.wrap(tiny_llama(len(tokenizer), 0), tokenizer, lora_rank=4, lora_alpha=8.0)
        torch.manual_seed(0)
        encoder = SSLSpeechEncoder.from_config(tiny_wavlm_config(), name="tiny-wavlm", trainable=trainable)
        config = tiny_model_config(encoder={"trainable": trainable})
        model = HarmoniFuse.from_parts(config, encoder, llm)
        for module in model.modules():  # dropout would draw differently in the recomputation
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        encoder.model.config.layerdrop = encoder.model.config.mask_time_prob = 0.0  # WavLM's training-time draws
        return model.train()

    frozen = build(False)
    assert frozen.enable_gradient_checkpointing() == ["llm"]  # nothing to save in a frozen encoder
    plain, checkpointed = build(True), build(True)
    assert checkpointed.enable_gradient_checkpointing() == ["llm", "encoder"]
    layers = [m for m in checkpointed.encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    # its 2 transformer layers and 2 convolution layers of the feature extractor
    assert len(layers) == 4 and all(layer.gradient_checkpointing for layer in layers)
    calls = []
    for layer in layers:  # count the recomputed calls: checkpointing really runs in the forward pass
        inner = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, _f=inner, **k: calls.append(1) or _f(*a, **k)
    grads = []
    for model in (plain, checkpointed):
        loss = model(_batch()).loss
        encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
        grads.append(torch.autograd.grad(loss, encoder_params + [model.projector.mlp[0].weight], allow_unused=True))
    assert len(calls) == len(layers)
    assert sum(g is not None for g in grads[1]) > 10  # the layers' weights among them
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # e.g. the last layer's unused parts, or the masked-frame embedding
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_new_model_fields_name_themselves_when_wrong():
    from harmonifuse.config import ConfigError, ModelConfig, from_dict

    with pytest.raises(ConfigError, match=r"model\.ctc\.vocab_chunk.*>= 0"):
        from_dict(ModelConfig, {"ctc": {"vocab_chunk": -1}}, prefix="model")
    with pytest.raises(ConfigError, match=r"model\.llm\.repetition_penalty"):
        from_dict(ModelConfig, {"llm": {"repetition_penalty": 0}}, prefix="model")
    with pytest.raises(ConfigError, match=r"model\.llm\.frozen_dtype"):
        from_dict(ModelConfig, {"llm": {"frozen_dtype": "float16"}}, prefix="model")


def test_chunked_ctc_under_bf16_autocast_stays_float32_and_matches_the_float32_loss():
    """Under autocast the chunked normaliser and its recomputation in the backward pass both run in
    float32 (the backward runs outside autocast): the loss and gradients of the float32 run."""
    speech, lengths, targets, table, blank = _ctc_case(4)
    head = EmbeddingCTC(2.0, learn_scale=True, vocab_chunk=50)
    reference = head(speech, lengths, targets, table, blank)
    expected = torch.autograd.grad(reference, [speech, head.log_scale])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(speech, lengths, targets, table, blank)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    for a, b in zip(torch.autograd.grad(loss, [speech, head.log_scale]), expected):
        torch.testing.assert_close(a, b)


def test_the_smollm2_fixture_is_the_shipped_models_template():
    from chat_templates import SMOLLM2

    from harmonifuse.assets import cache_dir

    folder = cache_dir() / "smollm2-135m-instruct"
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip("SmolLM2 not converted on this machine")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).chat_template == SMOLLM2
