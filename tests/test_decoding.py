"""Joint CTC/LLM beam search: the CTC prefix score against hand-computed and brute-force values and
against the frame loop it replaced, the search on toy LMs (and against the loop search it
replaced), greedy decoding of the tiny model token for token, and CTC-drafted decoding against the
step-by-step search."""
import itertools
import math

import pytest
import torch
from decoding_oracle import hf_generate
from tiny import perturbed, tiny_harmonifuse

from harmonifuse.config import ConfigError, ModelConfig, from_dict
from harmonifuse.decoding import (NEG, CTCPrefixScorer, CTCScores, DraftStats, beam_search, draft_greedy_search,
                                  realign_draft)
from harmonifuse.inference.int8 import inference_parts

# two frames over {blank, a, b}
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
BLANK, A, B, EOS = 0, 1, 2, 3


def _scorer(probs_rows, lengths):
    log_probs = torch.stack([p.log() for p in probs_rows])  # (R, T, C)
    return CTCPrefixScorer(log_probs, torch.tensor(lengths), BLANK)


def _extend(scorer, state, token_per_row):
    tokens = torch.tensor(token_per_row)
    psi = scorer.score(state, tokens[:, None], eos=EOS)[:, 0]
    return scorer.extend(state, torch.arange(len(tokens)), tokens, psi), psi


def test_prefix_scores_match_the_hand_computed_path_sums():
    scorer = _scorer([PROBS, PROBS], [2, 1])  # row 1 sees the first frame only
    state = scorer.initial_state()
    psi = scorer.score(state, torch.tensor([[A, B, EOS], [A, B, EOS]]), eos=EOS)
    # P(output starts with a) over two frames: aa + a_ + ab + _a = .12 + .12 + .06 + .20
    assert psi[0].exp().tolist() == pytest.approx([0.50, 0.30, 0.5 * 0.4])  # b: bb + b_ + ba + _b; eos: __
    assert psi[1].exp().tolist() == pytest.approx([0.3, 0.2, 0.5])
    state, after_a = _extend(scorer, state, [A, A])
    psi = scorer.score(state, torch.tensor([[B, A, EOS], [B, A, EOS]]), eos=EOS)
    assert psi[0].exp().tolist() == pytest.approx([0.06, 0.0, 0.44], abs=1e-7)  # ab; aa needs 3 frames; exactly a
    assert psi[1, 2].exp().item() == pytest.approx(0.3)


def _collapse(path):
    out, previous = [], None
    for label in path:
        if label != previous and label != BLANK:
            out.append(label)
        previous = label
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_prefix_scores_equal_brute_force_sums_over_all_paths(seed):
    torch.manual_seed(seed)
    T, C = 5, 3
    probs = torch.randn(T, C).softmax(-1)
    prefix_prob, exact_prob = {}, {}
    for path in itertools.product(range(C), repeat=T):
        p = math.prod(probs[t, label].item() for t, label in enumerate(path))
        out = tuple(_collapse(path))
        exact_prob[out] = exact_prob.get(out, 0.0) + p
        for n in range(len(out) + 1):
            prefix_prob[out[:n]] = prefix_prob.get(out[:n], 0.0) + p
    scorer = _scorer([probs], [T])
    for prefix in [(A,), (A, A), (A, B, A), (B, B)]:
        state = scorer.initial_state()
        for token in prefix[:-1]:
            state, _ = _extend(scorer, state, [token])
        psi = scorer.score(state, torch.tensor([[prefix[-1]]]), eos=EOS)
        assert psi.exp().item() == pytest.approx(prefix_prob.get(prefix, 0.0), abs=1e-6)
        state, _ = _extend(scorer, state, [prefix[-1]])
        assert scorer.full_score(state).exp().item() == pytest.approx(exact_prob.get(prefix, 0.0), abs=1e-6)


def _path_sum(probs, accept):
    """Sum of the probabilities of every CTC path over probs (T, C) whose output ``accept`` takes."""
    T, C = probs.shape
    return sum(math.prod(probs[t, label].item() for t, label in enumerate(path))
               for path in itertools.product(range(C), repeat=T) if accept(_collapse(path)))


def _toy_lm(table):
    """A bigram LM over 4 tokens: logits of the next token given the last one (row 3 = the start)."""
    def step(tokens, parents):
        return table[tokens]

    return table[torch.tensor([BLANK])], step  # the first step reads the start row


def test_ctc_weight_lets_the_speech_overrule_the_llm_prior():
    # the LM wants "b b" then eos; the CTC hears "a" then nothing
    table = torch.log(torch.tensor([[0.05, 0.05, 0.85, 0.05],   # start -> b
                                    [0.05, 0.05, 0.30, 0.60],   # after a: b or eos
                                    [0.01, 0.01, 0.48, 0.50],   # after b
                                    [0.25, 0.25, 0.25, 0.25]]))
    first, step = _toy_lm(table)
    ctc = torch.tensor([[0.1, 0.85, 0.05], [0.9, 0.05, 0.05], [0.95, 0.03, 0.02]]).log()[None]  # (1, T, C)
    common = dict(eos=EOS, max_new_tokens=5)
    scores = CTCScores(ctc, torch.tensor([3]), BLANK)
    assert beam_search(first, step, beam_size=1, ctc_weight=0.0, llm_candidates=2, ctc=scores, **common)[0].tokens == [B]
    joint = beam_search(first, step, beam_size=2, ctc_weight=0.5, llm_candidates=2,
                        ctc=CTCScores(ctc, torch.tensor([3]), BLANK, [[A]]), **common)[0]
    assert joint.tokens == [A]
    # the score is (1 - w) log p_LM + w log p_CTC of the whole answer
    llm = table[BLANK, A] + table[A, EOS]
    exactly_a = math.log(_path_sum(ctc[0].exp(), lambda out: out == [A]))
    assert joint.llm_logprob == pytest.approx(float(llm), abs=1e-5)
    assert joint.score == pytest.approx(0.5 * float(llm) + 0.5 * exactly_a, abs=1e-4)


def test_beam_search_stops_at_the_length_limit_with_unfinished_hypotheses():
    table = torch.log(torch.tensor([[0.1, 0.8, 0.05, 0.05]] * 4))  # never wants to stop
    first, step = _toy_lm(table)
    hyp = beam_search(first, step, eos=EOS, max_new_tokens=3, beam_size=2)[0]
    assert hyp.tokens == [A, A, A] and not hyp.finished
    assert hyp.llm_confidence == pytest.approx(0.8)


def test_joint_decoding_needs_the_ctc_posteriors():
    first, step = _toy_lm(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="CTC head's scores"):
        beam_search(first, step, eos=EOS, max_new_tokens=2, ctc_weight=0.3)


def test_greedy_decoding_equals_transformers_generate_and_beams_keep_the_batch_apart():
    model = tiny_harmonifuse(seed=0)
    perturbed(model)
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 9000, 12000])
    encoded = model.encode(torch.randn(3, 16000) * 0.1, lengths)
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * 3)
    prompts = model.prompts_for(["asr"] * 3)
    reference = hf_generate(model.llm, speech.embeddings, speech.lengths, prompts)
    greedy = model.llm.decode(speech.embeddings, speech.lengths, prompts)
    assert [model.llm.detokenize(h.tokens) for h in greedy] == reference
    log_probs, blank = model.ctc_log_probs(speech)
    joint = model.llm.decode(speech.embeddings, speech.lengths, prompts, beam_size=3, ctc_weight=0.5,
                             ctc=CTCScores(log_probs, speech.lengths, blank))
    for i in range(3):  # each item decoded alone gives the same hypothesis
        alone = model.llm.decode(speech.embeddings[i:i + 1], speech.lengths[i:i + 1], prompts[:1], beam_size=3,
                                 ctc_weight=0.5, ctc=CTCScores(log_probs[i:i + 1], speech.lengths[i:i + 1], blank))[0]
        assert alone.tokens == joint[i].tokens
        assert alone.score == pytest.approx(joint[i].score, abs=1e-4)
        assert alone.score > NEG / 2


def test_a_length_bound_forces_the_end_of_an_endless_answer():
    table = torch.log(torch.tensor([[0.1, 0.8, 0.05, 0.05]] * 4))
    first, step = _toy_lm(table)
    hyp = beam_search(first, step, eos=EOS, max_new_tokens=10, beam_size=2, max_lengths=[2])[0]
    assert hyp.tokens == [A, A] and hyp.finished
    assert hyp.llm_logprob == pytest.approx(2 * math.log(0.8) + math.log(0.05), abs=1e-5)


# -- the vectorised scorer and search against the loops they replaced (tests/decoding_oracle.py) ------

def _assert_same_scores(new, old, dtype):
    """Equal up to rounding where possible; impossible (<= NEG / 2) in both at the same places."""
    impossible = old <= NEG / 2
    assert torch.equal(new <= NEG / 2, impossible)
    tol = 4e-6 if dtype == torch.float32 else 1e-11  # the loop's own rounding over up to 90 frames
    torch.testing.assert_close(new[~impossible], old[~impossible], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed, utterances, beam, frames, width", [
    (0, 1, 1, 1, 3), (1, 2, 1, 9, 5), (2, 3, 2, 40, 7), (3, 2, 4, 90, 12), (4, 4, 3, 17, 1)])
def test_prefix_scores_and_states_equal_the_frame_loop(dtype, seed, utterances, beam, frames, width):
    from decoding_oracle import LoopCTCPrefixScorer

    g = torch.Generator().manual_seed(seed)
    C, eos = 30, 30  # eos: no CTC class
    sharp = 2.0 + 6.0 * (seed % 2)  # flat and peaked posteriors
    log_probs = (torch.randn(utterances, frames, C, generator=g, dtype=torch.float64) * sharp).log_softmax(-1).to(dtype)
    lengths = torch.randint(1, frames + 1, (utterances,), generator=g)  # padding after each length
    R = utterances * beam
    new = CTCPrefixScorer(log_probs, lengths, BLANK, repeats=beam)
    old = LoopCTCPrefixScorer(log_probs.repeat_interleave(beam, 0), lengths.repeat_interleave(beam), BLANK)
    state, old_state = new.initial_state(), old.initial_state()
    for _ in range(6):
        candidates = torch.randint(1, C, (R, width + 2), generator=g)
        candidates[:, 0] = state.last.clamp(min=1)  # the repeated label
        candidates[:, -1] = eos
        psi = new.score(state, candidates, eos)
        old_psi, old_r = old.score(old_state, candidates, eos)
        assert psi.dtype == dtype
        _assert_same_scores(psi, old_psi, dtype)
        for k in range(candidates.shape[1]):  # the forward variables of every extension
            rows = torch.arange(R)
            extended = new.extend(state, rows, candidates[:, k], psi[:, k], eos)
            _assert_same_scores(extended.r, old_r[:, :, k], dtype)
        # each row continues a random row of its utterance with a random candidate
        rows = torch.arange(R) // beam * beam + torch.randint(0, beam, (R,), generator=g)
        pick = torch.randint(0, candidates.shape[1] - 1, (R,), generator=g)
        tokens = candidates[rows, pick]
        state = new.extend(state, rows, tokens, psi[rows, pick], eos)
        old_state = old_state.select(rows, old_r, old_psi, pick, tokens)
        _assert_same_scores(new.full_score(state), old.full_score(old_state), dtype)


def _toy_history_lm(vocab: int, seed: int):
    """A random LM whose next-token logits depend on the whole history (a running hash): beams must be
    reordered right. ``make(B, W)``: first logits (B, V) and a fresh step over B * W rows."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(97, vocab, generator=g) * 2.5

    def make(B, W):
        history = (torch.arange(B) * 7 % 97).repeat_interleave(W)

        def step(tokens, parents):
            nonlocal history
            history = (history[parents] * 31 + tokens + 1) % 97
            return table[history]

        return table[torch.arange(B) * 7 % 97], step

    return make


@pytest.mark.parametrize("seed", range(10))
def test_beam_search_returns_what_the_loop_search_returned(seed):
    from decoding_oracle import loop_beam_search

    g = torch.Generator().manual_seed(100 + seed)
    V, eos, B = 14, 13, 3
    beam, ctc_weight = [(1, 0.0), (2, 0.0), (3, 0.4), (4, 0.3), (1, 0.5), (2, 0.7), (5, 0.2), (3, 0.0),
                        (2, 0.3), (4, 0.6)][seed]
    T = 12
    log_probs = (torch.randn(B, T, V, generator=g) * 3).log_softmax(-1)  # class 0 the blank, eos no class
    lengths = torch.tensor([T, 7, 10])
    ctc_tokens = [torch.randint(1, eos, (n,), generator=g).tolist() for n in (4, 0, 6)]
    common = dict(eos=eos, max_new_tokens=9, beam_size=beam, ctc_weight=ctc_weight, llm_candidates=3,
                  max_lengths=[9, 5, 12])
    make = _toy_history_lm(V, seed)
    new = beam_search(*make(B, beam), ctc=CTCScores(log_probs, lengths, 0, ctc_tokens), **common)
    old = loop_beam_search(*make(B, beam), ctc_log_probs=log_probs, ctc_lengths=lengths, blank=0, ctc_tokens=ctc_tokens,
                           **common)
    for a, b in zip(new, old):
        assert (a.tokens, a.finished) == (b.tokens, b.finished)
        assert a.score == pytest.approx(b.score, rel=1e-5) and a.llm_logprob == pytest.approx(b.llm_logprob, rel=1e-5)


# -- CTC-drafted decoding: the step-by-step answer in fewer forward passes ---------------------------

def _toy_verify(vocab: int, seed: int):
    """The LM of :func:`_toy_history_lm` read block by block (decoding.VerifyFn): ``make(B)`` -> first
    logits (B, V) and a fresh verify function."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(97, vocab, generator=g) * 2.5

    def make(B):
        history = torch.arange(B) * 7 % 97
        previous = None

        def verify(block, widths, kept):
            nonlocal history, previous
            if previous is not None:  # the kept tokens of the last block join the history
                for b in range(B):
                    for t in previous[b, : int(kept[b])].tolist():
                        history[b] = (history[b] * 31 + t + 1) % 97
            previous, state, logits = block.clone(), history.clone(), []
            for j in range(block.shape[1]):
                state = (state * 31 + block[:, j] + 1) % 97
                logits.append(table[state])
            return torch.stack(logits, dim=1)

        return table[torch.arange(B) * 7 % 97], verify

    return make


def _corrupt(tokens: list[int], seed: int, vocab: int) -> list[int]:
    """A draft with the errors CTC makes: substituted, inserted and dropped tokens."""
    import random

    rng, draft = random.Random(seed), list(tokens)
    for _ in range(rng.randint(0, 3)):
        at, edit = rng.randrange(len(draft) + 1), rng.choice("sid")
        if edit == "s" and at < len(draft):
            draft[at] = rng.randrange(vocab)
        elif edit == "i":
            draft.insert(at, rng.randrange(vocab))
        elif edit == "d" and at < len(draft):
            del draft[at]
    return draft


@pytest.mark.parametrize("seed", range(12))
def test_drafted_greedy_search_equals_the_step_by_step_search_on_a_toy_lm(seed):
    V, eos, B, T = 14, 13, 3, 12
    g = torch.Generator().manual_seed(seed)
    log_probs = (torch.randn(B, T, V, generator=g) * 3).log_softmax(-1)
    ctc_tokens = [torch.randint(1, eos, (n,), generator=g).tolist() for n in (4, 0, 6)]
    common = dict(eos=eos, max_new_tokens=10, ctc_weight=[0.0, 0.4][seed % 2], llm_candidates=3,
                  ctc=CTCScores(log_probs, torch.tensor([T, 7, 10]), 0, ctc_tokens), max_lengths=[10, 5, 12])
    reference = beam_search(*_toy_history_lm(V, seed)(B, 1), beam_size=1, **common)
    drafts = [_corrupt(h.tokens, seed * 10 + b, V) for b, h in enumerate(reference)]
    stats = DraftStats()
    drafted = draft_greedy_search(*_toy_verify(V, seed)(B), drafts=drafts, draft_tokens=4, stats=stats, **common)
    for a, b in zip(drafted, reference):  # the same arithmetic on the same logits: equal, not close
        assert (a.tokens, a.finished, a.score, a.llm_logprob) == (b.tokens, b.finished, b.score, b.llm_logprob)
    steps = max(len(h.tokens) + h.finished for h in reference)  # the step-by-step search's forward passes
    assert stats.forwards <= steps and 0 <= stats.accepted <= stats.drafted


def test_a_right_draft_settles_a_whole_answer_in_one_forward_pass():
    V, eos = 14, 13
    reference = beam_search(*_toy_history_lm(V, 3)(2, 1), eos=eos, max_new_tokens=10, beam_size=1)
    stats = DraftStats()
    drafted = draft_greedy_search(*_toy_verify(V, 3)(2), eos=eos, max_new_tokens=10, stats=stats,
                                  drafts=[h.tokens for h in reference], draft_tokens=16)
    assert [h.tokens for h in drafted] == [h.tokens for h in reference]
    assert min(len(h.tokens) for h in reference) >= 3
    # each answer: its first token from the context's logits, the rest checked in one pass
    assert stats.forwards == 1 and stats.acceptance_rate == 1.0
    assert stats.tokens_per_forward == pytest.approx(sum(len(h.tokens) for h in reference) / 2)


def test_the_draft_realigns_after_a_correction():
    draft = [10, 11, 12, 13, 14]
    assert realign_draft(draft, 1, 11) == 2  # agreed
    assert realign_draft(draft, 1, 13) == 4  # the draft had tokens the answer has not
    assert realign_draft(draft, 1, 99) == 1  # a token the draft lacks: it waits
    assert realign_draft(draft, 0, 14) == 0  # too far ahead to be the same place
    assert realign_draft(draft, 5, 99) == 5  # past the end


def _tiny_speech(eos_boost: float = 2.0):
    """The perturbed tiny model with eos made likelier (answers ending at different steps, one at
    once), and speech of four lengths (padding)."""
    model = tiny_harmonifuse(seed=0)
    perturbed(model)
    with torch.no_grad():
        table = model.llm.model.get_input_embeddings().weight  # tied: also the output layer
        direction = table.mean(0)
        table[model.llm.eos_token_id] += eos_boost * direction / direction.norm() * table.norm(dim=1).mean()
    torch.manual_seed(0)
    encoded = model.encode(torch.randn(4, 16000) * 0.1, torch.tensor([16000, 2400, 12000, 9000]))
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * 4)
    return model, speech, model.prompts_for(["asr"] * 4)


@pytest.mark.parametrize("ctc_weight, penalty, per_position", [(0.0, 1.0, 1.0), (0.5, 1.0, 0.02), (0.0, 1.3, 1.0)])
def test_ctc_drafts_give_the_step_by_step_greedy_answer_of_the_tiny_model(ctc_weight, penalty, per_position):
    from harmonifuse.modules.ctc import greedy_ctc_from_logits

    model, speech, prompts = _tiny_speech()
    model.llm.repetition_penalty = penalty
    log_probs, blank = model.ctc_log_probs(speech)
    greedy = greedy_ctc_from_logits(log_probs, speech.lengths, blank)
    common = dict(ctc_weight=ctc_weight, ctc=CTCScores(log_probs, speech.lengths, blank, greedy if ctc_weight else None),
                  max_new_tokens=12, max_tokens_per_position=per_position)
    steps = DraftStats()
    reference = model.llm.decode(speech.embeddings, speech.lengths, prompts, stats=steps, **common)
    ends = [(len(h.tokens), h.finished) for h in reference]
    assert len({n for n, _ in ends}) >= 3 and any(f for _, f in ends)  # ends (eos or bound) at different steps
    assert steps.tokens_per_forward == 1.0
    vocab = len(model.llm.tokenizer)
    for name, drafts in [("ctc", greedy), ("right", [h.tokens for h in reference]),
                         ("edited", [_corrupt(h.tokens, i, vocab) for i, h in enumerate(reference)])]:
        stats = DraftStats()
        drafted = model.llm.decode(speech.embeddings, speech.lengths, prompts, drafts=drafts, draft_tokens=4,
                                   stats=stats, **common)
        for a, b in zip(drafted, reference):
            assert (a.tokens, a.finished) == (b.tokens, b.finished), name
            assert (a.score, a.llm_logprob) == pytest.approx((b.score, b.llm_logprob), abs=1e-4)
        if name == "right":
            assert stats.acceptance_rate == 1.0 and stats.forwards < steps.forwards
            assert stats.tokens_per_forward > 2


def test_model_decoding_draft_ctc_answers_as_without_and_counts_its_forward_passes():
    model, _, _ = _tiny_speech()
    model.config.decoding.ctc_weight = 0.3
    torch.manual_seed(0)
    encoded = model.encode(torch.randn(3, 16000) * 0.1, torch.tensor([16000, 2400, 9000]))
    plain = model.analyze_hidden(encoded.hidden_states, encoded.lengths, tasks=["asr"])
    model.config.decoding.draft = "ctc"
    model.decode_stats = DraftStats()
    drafted = model.analyze_hidden(encoded.hidden_states, encoded.lengths, tasks=["asr"])
    assert drafted == plain
    assert model.decode_stats.forwards > 0 and model.decode_stats.row_passes > 0


def test_drafts_need_greedy_decoding():
    with pytest.raises(ConfigError, match="needs beam_size 1"):
        from_dict(ModelConfig, {"decoding": {"draft": "ctc", "beam_size": 4}})
    with pytest.raises(ConfigError, match="needs beam_size 1"):  # the default beam of 4 too
        from_dict(ModelConfig, {"decoding": {"draft": "ctc"}})
    assert from_dict(ModelConfig, {"decoding": {"draft": "ctc", "beam_size": 1}}).decoding.draft_tokens == 4


# -- dynamic int8 on the CPU (model.decoding.int8) --------------------------------------------------

def test_int8_answers_stay_close_to_float_and_leave_the_float_model_as_it_was():
    model, _, _ = _tiny_speech(eos_boost=0.0)
    torch.manual_seed(0)
    encoded = model.encode(torch.randn(3, 16000) * 0.1, torch.tensor([16000, 6000, 9000]))
    prompts = model.prompts_for(["ser"] * 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model.analyze_hidden(encoded.hidden_states, encoded.lengths)
    model.config.decoding.int8 = True
    quantized = model.analyze_hidden(encoded.hidden_states, encoded.lengths)
    llm, projector = model.int8_parts()
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    modules = dict([*llm.named_modules(), *projector.named_modules(prefix="projector")])
    int8 = [n for n, m in modules.items() if isinstance(m, Int8Linear)]
    float_ = [n for n, m in modules.items() if type(m) is torch.nn.Linear or "peft" in type(m).__module__]
    assert len(int8) == 2 * 6 + 1 + 2  # 2 layers x 6 projections, the head, the projector's MLP
    assert float_ == [f"model.model.layers.{i}.mlp.down_proj" for i in range(2)]  # INT8_KEEP_FLOAT
    assert model.llm is not llm and model.projector is not projector  # swapped back after inference
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    # int8 rounding of a tiny model's large activations (hidden size 32): label log-likelihoods of
    # ~30 nats move by up to ~1.5 (measured), so the emotion probabilities by up to ~0.4
    for p, q in zip(plain, quantized):
        assert sum(abs(p["emotion_probs"][e] - q["emotion_probs"][e]) for e in p["emotion_probs"]) / 2 < 0.5
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["ser"] * 3, prompts)
    labels = model.config.tasks.emotion_labels
    exact = model.llm.score_labels(speech.embeddings, speech.lengths, prompts, labels)
    with inference_parts(model):
        speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["ser"] * 3, prompts)
        approx = model.llm.score_labels(speech.embeddings, speech.lengths, prompts, labels)
    assert (approx - exact).abs().max() <= 0.06 * exact.abs().max()
    assert not torch.equal(approx, exact)  # int8 really ran
    # a changed weight makes new copies
    with torch.no_grad():
        next(model.projector.parameters()).add_(0.1)
    assert model.int8_parts()[1] is not projector
