"""SpecAugment-style masking of cached hidden states."""
import types

import pytest
import torch
from tiny import tiny_harmonifuse

from harmonifuse.config import ConfigError, ModelConfig, from_dict
from harmonifuse.modules.feature_masking import FeatureMasking


def _states(T=50, D=32, B=3):
    torch.manual_seed(0)
    return torch.randn(5, B, T, D) + 3.0, torch.tensor([50, 30, 8])


def test_eval_mode_and_no_masks_are_the_identity():
    hidden, lengths = _states()
    masking = FeatureMasking(time_masks=2, channel_masks=2).eval()
    assert masking(hidden, lengths) is hidden
    assert FeatureMasking().train()(hidden, lengths) is hidden


def test_masks_hit_every_layer_alike_and_stay_inside_the_utterance():
    hidden, lengths = _states()
    masking = FeatureMasking(time_masks=2, time_width=10, channel_masks=2, channel_width=6).train()
    torch.manual_seed(3)
    masked = masking(hidden, lengths)
    zero = masked == 0  # the inputs are never exactly 0, so zeros are the masks
    assert zero.any()
    assert torch.equal(zero, zero[:1].expand_as(zero))  # the same cells in every layer
    whole_frames = zero[0].all(-1)  # (B, T) frames masked in every channel: the time masks
    whole_channels = zero[0].all(1)  # (B, D): the channel masks
    for b, n in enumerate(lengths.tolist()):
        masked_frames = whole_frames[b].nonzero().squeeze(1)
        assert (masked_frames < n).all()
        # at most 2 spans, each at most min(10, 20 % of the utterance) frames
        assert len(masked_frames) <= 2 * max(1, min(10, int(0.2 * n)))
        assert int(whole_channels[b].sum()) <= 2 * 6
    # every zero is explained by a time or a channel mask
    assert torch.equal(zero[0], whole_frames[:, :, None] | whole_channels[:, None, :])
    # seeded: the same masks again
    torch.manual_seed(3)
    assert torch.equal(masking(hidden, lengths), masked)


def test_the_model_masks_in_training_only():
    model = tiny_harmonifuse(seed=0, feature_masking={"time_masks": 2, "time_width": 4, "channel_masks": 2})
    torch.manual_seed(1)
    encoded = model.encode(torch.randn(2, 16000) * 0.1, torch.tensor([16000, 12000]))
    batch = types.SimpleNamespace(hidden_states=encoded.hidden_states, frame_lengths=encoded.lengths,
                                  tasks=["ser", "ser"], targets=["sad", "happy"])
    with torch.no_grad():
        model.eval()
        clean = float(model(batch).loss)
        model.train()
        assert float(model(batch).loss) != pytest.approx(clean, rel=1e-6)
        model.feature_masking.time_masks = model.feature_masking.channel_masks = 0
        assert float(model(batch).loss) == pytest.approx(clean, rel=1e-6)


def test_bad_mask_settings_name_the_field():
    with pytest.raises(ConfigError, match="model.feature_masking.time_width"):
        from_dict(ModelConfig, {"feature_masking": {"time_width": 0}}, prefix="model")
