"""Fusion, gate and projector: formulas checked by hand and reference values pinned on seeded modules."""
import pytest
import torch

from harmonifuse.lengths import lengths_to_mask
from harmonifuse.modules.fusion import build_fusion
from harmonifuse.modules.gate import build_gate
from harmonifuse.modules.projector import FrameStackProjector


def _inputs():
    torch.manual_seed(0)
    return torch.randn(3, 2, 5, 4), torch.randn(2, 6), torch.tensor([0, 1])  # (L+1, B, T, D), (B, P), (B,)


def _prompt_fusion():
    fusion = build_fusion("prompt", 3, 4, 6, 2)
    torch.manual_seed(1)
    with torch.no_grad():
        fusion.weighting.proj.weight.normal_()
        fusion.weighting.bias.normal_()
    return fusion


@pytest.mark.parametrize("mode", ["static", "task", "prompt"])
def test_fusion_starts_as_uniform_weighted_sum(mode):
    hidden, prompt, task_ids = _inputs()
    fusion = build_fusion(mode, 3, 4, 6, 2)
    assert torch.allclose(fusion.weights(prompt, task_ids), torch.full((2, 3), 1 / 3))
    expected = torch.nn.functional.layer_norm(hidden, (4,)).mean(0)
    assert torch.allclose(fusion(hidden, prompt, task_ids), expected, atol=1e-6)


def test_prompt_fusion_matches_formula_and_reference_values():
    hidden, prompt, task_ids = _inputs()
    fusion = _prompt_fusion()
    w = fusion.weighting
    p = torch.nn.functional.layer_norm(prompt, (6,))
    alpha = torch.softmax(w.bias + (p / 6 ** 0.5) @ w.proj.weight.T, dim=-1)
    assert torch.allclose(fusion.weights(prompt, task_ids), alpha)
    manual = sum(alpha[:, l, None, None] * torch.nn.functional.layer_norm(hidden[l], (4,)) for l in range(3))
    fused = fusion(hidden, prompt, task_ids)
    assert torch.allclose(fused, manual, atol=1e-6)
    # reference values of this seeded module (guards against silent changes of the formulation)
    assert alpha[0].tolist() == pytest.approx([0.0890527, 0.7356817, 0.1752656], abs=1e-6)
    assert fused[0, 0].tolist() == pytest.approx([-0.4818207, 1.3691478, -0.8661665, -0.0211606], abs=1e-6)


def test_prompt_fusion_weights_differ_between_prompts_once_trained():
    _, prompt, task_ids = _inputs()
    fusion = build_fusion("prompt", 3, 4, 6, 2)
    same_task = torch.tensor([0, 0])
    assert torch.allclose(*fusion.weights(prompt, same_task))  # W_a = 0: the prompt has no say yet
    with torch.no_grad():
        fusion.weighting.proj.weight.normal_()
    w = fusion.weights(prompt, same_task)
    assert not torch.allclose(w[0], w[1], atol=1e-3)


def test_task_fusion_depends_on_task_id_only():
    _, prompt, _ = _inputs()
    fusion = build_fusion("task", 3, 4, 6, 2)
    with torch.no_grad():
        fusion.weighting.logits.normal_()
    w = fusion.weights(prompt, torch.tensor([1, 1]))
    assert torch.allclose(w[0], w[1])
    assert not torch.allclose(fusion.weights(prompt, torch.tensor([0]))[0], w[0])


def test_fusion_temperature_sharpens():
    _, prompt, task_ids = _inputs()
    fusion = _prompt_fusion()
    fusion.temperature = 0.1
    assert fusion.weights(prompt, task_ids).max(-1).values.min() > 0.99


@pytest.mark.parametrize("mode", ["none", "channel", "content"])
def test_gate_starts_as_identity(mode):
    hidden, prompt, _ = _inputs()
    gate = build_gate(mode, 4, 6)
    out, g = gate(hidden[0], prompt)
    assert torch.equal(out, hidden[0])
    if mode != "none":
        assert torch.all(g == 1)


def test_content_gate_formula_and_reference_values():
    hidden, prompt, _ = _inputs()
    features = hidden[1]
    gate = build_gate("content", 4, 6)
    torch.manual_seed(2)
    with torch.no_grad():
        for parameter in gate.parameters():
            parameter.normal_()
    p = torch.nn.functional.layer_norm(prompt, (6,))
    g = 2 * torch.sigmoid((features / 2) @ gate.from_content.weight.T  # / sqrt(D = 4)
                          + ((p / 6 ** 0.5) @ gate.from_prompt.weight.T + gate.from_prompt.bias)[:, None])
    out, g_out = gate(features, prompt)
    assert torch.allclose(g_out, g, atol=1e-6)
    assert torch.allclose(out, features * g, atol=1e-6)
    assert 0 < float(g.min().detach()) and float(g.max().detach()) < 2
    assert float(out.sum()) == pytest.approx(4.0032878, abs=1e-5)


def test_channel_gate_is_constant_over_time():
    hidden, prompt, _ = _inputs()
    gate = build_gate("channel", 4, 6)
    with torch.no_grad():
        gate.from_prompt.weight.normal_()
    _, g = gate(hidden[0], prompt)
    assert g.shape == (2, 1, 4)
    assert not torch.allclose(g[0], g[1])


def test_projector_stacks_frames_and_tracks_lengths():
    torch.manual_seed(3)
    projector = FrameStackProjector(4, 8, stack=2, hidden_size=6)
    features = torch.randn(2, 5, 4)
    out, lengths = projector(features, torch.tensor([5, 3]))
    assert out.shape == (2, 3, 8) and lengths.tolist() == [3, 2]
    # position 1 sees frames 2 and 3 concatenated; the last position sees frame 4 and zero padding
    assert torch.allclose(out[0, 1], projector.mlp(torch.cat([features[0, 2], features[0, 3]])), atol=1e-6)
    assert torch.allclose(out[0, 2], projector.mlp(torch.cat([features[0, 4], torch.zeros(4)])), atol=1e-6)
    assert float(out.sum()) == pytest.approx(-5.1517382, abs=1e-5)


def test_projector_output_rms_fixes_the_scale_of_every_position_but_not_its_direction():
    torch.manual_seed(3)
    free = FrameStackProjector(4, 8, stack=2, hidden_size=6)
    scaled = FrameStackProjector(4, 8, stack=2, hidden_size=6, output_rms=0.25)
    scaled.load_state_dict(free.state_dict())
    features = torch.randn(2, 5, 4) * 30
    out_free, _ = free(features, torch.tensor([5, 3]))
    out, _ = scaled(features, torch.tensor([5, 3]))
    assert torch.allclose(out.pow(2).mean(-1).sqrt(), torch.full((2, 3), 0.25), atol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(out, out_free, dim=-1), torch.ones(2, 3), atol=1e-5)
    assert list(dict(scaled.named_parameters())) == list(dict(free.named_parameters()))
    with pytest.raises(ValueError, match="output_rms must be > 0"):
        FrameStackProjector(4, 8, output_rms=0.0)


def test_lengths_to_mask_marks_valid_frames_and_refuses_non_vector_lengths():
    lengths = torch.tensor([3, 0, 5])
    expected = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(lengths_to_mask(lengths, 4), expected)  # size shorter than the longest item
    assert lengths_to_mask(lengths, 6)[2].tolist() == [True] * 5 + [False]
    with pytest.raises(ValueError, match=r"\(B,\) tensor"):
        lengths_to_mask(lengths[None, :], 4)
