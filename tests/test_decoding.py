"""Joint CTC/LLM beam search: the CTC prefix score against hand-computed and brute-force values,
the search on a toy LM, and greedy decoding of the tiny model token for token."""
import itertools
import math

import pytest
import torch
from tiny import perturbed, tiny_harmonifuse

from harmonifuse.decoding import NEG, CTCPrefixScorer, beam_search

# two frames over {blank, a, b}
PROBS = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2]])
BLANK, A, B, EOS = 0, 1, 2, 3


def _scorer(probs_rows, lengths):
    log_probs = torch.stack([p.log() for p in probs_rows])  # (R, T, C)
    return CTCPrefixScorer(log_probs, torch.tensor(lengths), BLANK)


def _extend(scorer, state, token_per_row):
    candidates = torch.tensor([[t] for t in token_per_row])
    psi, r = scorer.score(state, candidates, eos=EOS)
    rows = torch.arange(len(token_per_row))
    return state.select(rows, r, psi, torch.zeros_like(rows), candidates[:, 0]), psi[:, 0]


def test_prefix_scores_match_the_hand_computed_path_sums():
    scorer = _scorer([PROBS, PROBS], [2, 1])  # row 1 sees the first frame only
    state = scorer.initial_state()
    psi, _ = scorer.score(state, torch.tensor([[A, B, EOS], [A, B, EOS]]), eos=EOS)
    # P(output starts with a) over two frames: aa + a_ + ab + _a = .12 + .12 + .06 + .20
    assert psi[0].exp().tolist() == pytest.approx([0.50, 0.30, 0.5 * 0.4])  # b: bb + b_ + ba + _b; eos: __
    assert psi[1].exp().tolist() == pytest.approx([0.3, 0.2, 0.5])
    state, after_a = _extend(scorer, state, [A, A])
    psi, _ = scorer.score(state, torch.tensor([[B, A, EOS], [B, A, EOS]]), eos=EOS)
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
        psi, _ = scorer.score(state, torch.tensor([[prefix[-1]]]), eos=EOS)
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
    common = dict(eos=EOS, max_new_tokens=5, ctc_log_probs=ctc, ctc_lengths=torch.tensor([3]), blank=BLANK)
    assert beam_search(first, step, beam_size=1, ctc_weight=0.0, llm_candidates=2, **common)[0].tokens == [B]
    joint = beam_search(first, step, beam_size=2, ctc_weight=0.5, llm_candidates=2, ctc_tokens=[[A]], **common)[0]
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
    with pytest.raises(ValueError, match="ctc_log_probs"):
        beam_search(first, step, eos=EOS, max_new_tokens=2, ctc_weight=0.3)


def test_greedy_decoding_equals_transformers_generate_and_beams_keep_the_batch_apart():
    model = tiny_harmonifuse(seed=0)
    perturbed(model)
    torch.manual_seed(1)
    lengths = torch.tensor([16000, 9000, 12000])
    encoded = model.encode(torch.randn(3, 16000) * 0.1, lengths)
    speech = model.speech_embeddings(encoded.hidden_states, encoded.lengths, ["asr"] * 3)
    prompts = model.prompts_for(["asr"] * 3)
    reference = model.llm.generate(speech.embeddings, speech.lengths, prompts)
    greedy = model.llm.decode(speech.embeddings, speech.lengths, prompts)
    assert [model.llm.detokenize(h.tokens) for h in greedy] == reference
    log_probs, blank = model.ctc_log_probs(speech)
    joint = model.llm.decode(speech.embeddings, speech.lengths, prompts, beam_size=3, ctc_weight=0.5,
                             ctc_log_probs=log_probs, ctc_lengths=speech.lengths, blank=blank)
    for i in range(3):  # each item decoded alone gives the same hypothesis
        alone = model.llm.decode(speech.embeddings[i:i + 1], speech.lengths[i:i + 1], prompts[:1], beam_size=3,
                                 ctc_weight=0.5, ctc_log_probs=log_probs[i:i + 1], ctc_lengths=speech.lengths[i:i + 1],
                                 blank=blank)[0]
        assert alone.tokens == joint[i].tokens
        assert alone.score == pytest.approx(joint[i].score, abs=1e-4)
        assert alone.score > NEG / 2


def test_a_length_bound_forces_the_end_of_an_endless_answer():
    table = torch.log(torch.tensor([[0.1, 0.8, 0.05, 0.05]] * 4))
    first, step = _toy_lm(table)
    hyp = beam_search(first, step, eos=EOS, max_new_tokens=10, beam_size=2, max_lengths=[2])[0]
    assert hyp.tokens == [A, A] and hyp.finished
    assert hyp.llm_logprob == pytest.approx(2 * math.log(0.8) + math.log(0.05), abs=1e-5)
