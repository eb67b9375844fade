"""Waveform augmentation (harmonifuse/data/augmentation.py): each transform, the seeded composition,
the loader that applies it and the ``data.augment`` config section."""
from __future__ import annotations

import types

import numpy as np
import pytest
import soundfile as sf

from harmonifuse.config import ConfigError, load_config
from harmonifuse.config.run import WAVE_AUGMENT_ORDER, RunConfig, WaveAugmentConfig
from harmonifuse.data import augmentation as aug
from harmonifuse.data.dataset import MultiTaskLoader, SpeechTaskDataset
from harmonifuse.data.manifest import Utterance
from harmonifuse.data.sampler import BatchInterleavedSampler
from harmonifuse.training.loaders import build_run_data, build_wave_augment

SR = 16_000


def _speechlike(seconds: float = 2.0, amplitude: float = 0.1, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding 120-180 Hz pitch, amplitude modulated like syllables, a little noise."""
    t = np.arange(int(seconds * SR)) / SR
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    x = voiced * envelope + 0.05 * np.random.default_rng(seed).standard_normal(t.size)
    return (amplitude * x / np.max(np.abs(x))).astype(np.float32)


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


def _snr_db(clean: np.ndarray, mixed: np.ndarray) -> float:
    return 10 * np.log10(_power(clean) / _power(mixed.astype(np.float64) - clean))


def _band_energy(x: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum())


def _f0(x: np.ndarray) -> float:
    """Frequency of the strongest spectral peak (a pure tone's frequency)."""
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / SR)[np.argmax(spectrum)])


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_changes_duration_by_one_over_the_factor_and_pitch_by_it(factor):
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(32_000) / SR)).astype(np.float32)
    out = aug.SpeedPerturb(factors=(factor,))(tone, np.random.default_rng(0))
    assert out.dtype == np.float32
    assert abs(out.size - tone.size / factor) <= 1
    assert _f0(out) == pytest.approx(200 * factor, abs=2)


def test_speed_factor_one_returns_the_input():
    x = _speechlike()
    assert aug.SpeedPerturb(factors=(1.0,))(x, np.random.default_rng(0)) is x


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize("kind", ["white", "pink", "brown", "babble"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 30.0])
def test_added_noise_has_the_requested_snr(kind, snr):
    clean = _speechlike(seed=1)
    babble = aug.Babble([_speechlike(1.3, seed=s) for s in range(2, 6)], talkers=(3, 3))
    transform = aug.AddNoise(snr_db=(snr, snr), kinds=(kind,), babble=babble)
    mixed = transform(clean, np.random.default_rng(7))
    assert mixed.shape == clean.shape and mixed.dtype == np.float32
    assert _snr_db(clean, mixed) == pytest.approx(snr, abs=0.5)


def test_a_loud_mix_is_scaled_down_whole_so_the_snr_stays():
    clean = _speechlike(amplitude=0.9)
    noise = np.random.default_rng(0).standard_normal(clean.size)
    mixed = aug.mix_at_snr(clean, noise, 0.0)
    assert np.max(np.abs(mixed)) <= 0.99 + 1e-6
    # mixed = k * (clean + g * noise): recover k and k * g by least squares
    (k, kg), *_ = np.linalg.lstsq(np.stack([clean, noise], axis=1).astype(np.float64), mixed, rcond=None)
    assert k < 0.9
    assert 10 * np.log10(_power(clean) * k ** 2 / (kg ** 2 * _power(noise))) == pytest.approx(0.0, abs=0.5)


def test_pink_and_brown_noise_tilt_down():
    rng = np.random.default_rng(0)
    tilt = {kind: _band_energy(aug._coloured_noise(kind, 32_000, rng), 100, 500)
            / _band_energy(aug._coloured_noise(kind, 32_000, rng), 3000, 7000)
            for kind in ("white", "pink", "brown")}
    assert tilt["white"] < 0.2 < tilt["pink"] < tilt["brown"]


def test_babble_is_made_of_other_utterances_read_from_files(tmp_path):
    talker = _speechlike(1.0, seed=3)
    path = tmp_path / "other.wav"
    sf.write(path, talker, SR, subtype="FLOAT")
    babble = aug.Babble([str(path), str(tmp_path / "missing.wav")], talkers=(1, 1))
    rng = np.random.default_rng(0)
    outs = [babble(24_000, rng) for _ in range(6)]
    heard = [o for o in outs if o.any()]  # a missing file contributes no talker
    assert heard
    for out in heard:  # the utterance at unit level, looped from a random start
        assert _power(out) == pytest.approx(1.0, rel=0.05)
        unit = talker / np.sqrt(_power(talker))
        start = next(s for s in range(talker.size) if np.allclose(out[:50], np.resize(unit, 2 * talker.size)[s:s + 50], atol=1e-4))
        assert np.allclose(out, np.resize(unit, 24_000 + talker.size)[start:start + 24_000], atol=1e-4)
    with pytest.raises(ValueError, match="babble.*needs a Babble source"):
        aug.AddNoise(kinds=("babble",))


# --------------------------------------------------------------------------- band limiting


def test_telephone_band_removes_energy_below_300_hz_and_above_3400_hz():
    x = (0.1 * np.random.default_rng(0).standard_normal(2 * SR)).astype(np.float32)
    y = aug.BandLimit()(x, np.random.default_rng(0))
    assert y.shape == x.shape

    def drop_db(low, high):
        return 10 * np.log10(_band_energy(y, low, high) / _band_energy(x, low, high))

    assert drop_db(0, 300) < -10 and drop_db(0, 200) < -30
    assert drop_db(3400, 8000) < -10 and drop_db(4000, 8000) < -25 and drop_db(5000, 8000) < -50
    assert abs(drop_db(500, 3000)) < 0.5  # the pass band is kept
    low_pass = aug.BandLimit(bands=((0.0, 4000.0),))(x, np.random.default_rng(0))
    assert 10 * np.log10(_band_energy(low_pass, 5000, 8000) / _band_energy(x, 5000, 8000)) < -25
    assert abs(10 * np.log10(_band_energy(low_pass, 50, 3000) / _band_energy(x, 50, 3000))) < 0.5
    with pytest.raises(ValueError, match="need 0 <= low < high < 8000"):
        aug.BandLimit(bands=((300.0, 9000.0),))


# --------------------------------------------------------------------------- reverberation


def test_reverb_keeps_length_and_level_and_is_deterministic_for_a_seed():
    x = _speechlike()
    reverb = aug.Reverb()
    y = reverb(x, np.random.default_rng(5))
    assert y.shape == x.shape and y.dtype == np.float32
    assert _power(y) == pytest.approx(_power(x), rel=1e-3)
    assert np.array_equal(y, reverb(x, np.random.default_rng(5)))
    assert not np.array_equal(y, reverb(x, np.random.default_rng(6)))
    assert not np.allclose(y, x, atol=1e-3)


def test_the_impulse_response_decays_60_db_in_rt60():
    ir = aug.Reverb(rt60=(0.5, 0.5), drr_db=(3.0, 3.0)).impulse_response(np.random.default_rng(1))
    assert ir[0] == 1.0 and ir.size <= 0.5 * SR + 0.01 * SR

    def level(a, b):
        return np.mean(ir[int(a * SR):int(b * SR)] ** 2)

    assert 10 * np.log10(level(0.05, 0.10) / level(0.30, 0.35)) == pytest.approx(30.0, abs=2.0)  # 0.25 s
    assert 10 * np.log10(1.0 / np.sum(ir[1:] ** 2)) == pytest.approx(3.0, abs=1e-6)  # direct / reverberant


# --------------------------------------------------------------------------- codecs


def test_libsndfile_writes_the_lossy_codecs():
    assert {"vorbis", "opus", "mp3"} <= set(aug.available_codecs())


@pytest.mark.parametrize("codec, frame", [("vorbis", 0), ("opus", 0), ("mp3", 1152), ("gsm", 320), ("ulaw", 1)])
def test_codec_round_trip_keeps_length_within_a_frame_and_changes_the_samples(codec, frame):
    if codec not in aug.available_codecs():
        pytest.skip(f"this libsndfile does not write {codec}")
    x = _speechlike(2.3)[:36_817]  # not a multiple of any frame
    raw = aug.codec_round_trip(x, codec, 0.6)
    assert abs(raw.size - x.size) <= frame
    out = aug.CodecRoundTrip(codecs=(codec,), compression=(0.6, 0.6))(x, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    assert not np.array_equal(out, x)
    assert 12 < _snr_db(x, out) < 60  # the same sound, degraded


def test_higher_compression_degrades_more():
    x = _speechlike(1.5)
    snr = {level: _snr_db(x, aug.codec_round_trip(x, "opus", level)[: x.size]) for level in (0.0, 0.95)}
    assert snr[0.95] < snr[0.0] - 5
    with pytest.raises(ValueError, match="compression"):
        aug.CodecRoundTrip(compression=(0.5, 1.0))


# --------------------------------------------------------------------------- level


def test_gain_scales_and_clips():
    x = _speechlike(amplitude=0.4)
    louder = aug.Gain(db=(6.0, 6.0), clip=False)(x, np.random.default_rng(0))
    assert np.allclose(louder, x * 10 ** (6 / 20), rtol=1e-6)
    clipped = aug.Gain(db=(12.0, 12.0))(x, np.random.default_rng(0))
    assert np.max(np.abs(clipped)) == 1.0 and np.mean(np.abs(clipped) == 1.0) > 0.01


# --------------------------------------------------------------------------- composition


def _all_transforms(babble_sources) -> aug.WaveAugment:
    return aug.WaveAugment([
        (aug.SpeedPerturb(), 1.0), (aug.Reverb(), 1.0),
        (aug.AddNoise(kinds=tuple(aug.NOISE_KINDS), babble=aug.Babble(babble_sources)), 1.0),
        (aug.BandLimit(), 0.5), (aug.CodecRoundTrip(), 0.5), (aug.Gain(), 1.0)], seed=3)


def test_the_same_seed_item_and_step_draw_the_same_and_another_step_draws_anew():
    x = _speechlike()
    augment = _all_transforms([_speechlike(1.0, seed=s) for s in range(3)])
    first = augment(x, item_id="utt-1", step=4, epoch=0)
    assert first.dtype == np.float32 and not np.array_equal(first, x)
    again = _all_transforms([_speechlike(1.0, seed=s) for s in range(3)])  # e.g. a worker, a resumed run
    assert np.array_equal(again(x, item_id="utt-1", step=4, epoch=0), first)
    others = [augment(x, item_id="utt-1", step=5), augment(x, item_id="utt-2", step=4),
              augment(x, item_id="utt-1", step=4, epoch=1), augment(x, item_id="utt-1", step=4, stage="align"),
              aug.WaveAugment(augment.steps, seed=4)(x, item_id="utt-1", step=4)]
    for other in others:
        assert other.shape != first.shape or not np.array_equal(other, first)


def test_each_transform_draws_from_its_own_stream():
    x = _speechlike()
    gain = aug.Gain(db=(-10.0, 10.0), clip=False)
    alone = aug.WaveAugment([(gain, 1.0)], seed=1)(x, item_id="a", step=2)
    with_reverb_off = aug.WaveAugment([(aug.Reverb(), 0.0), (gain, 1.0)], seed=1)(x, item_id="a", step=2)
    assert np.array_equal(alone, with_reverb_off)


def test_probability_is_per_item_and_an_all_off_augment_is_falsy():
    x = _speechlike(0.1)
    augment = aug.WaveAugment([(aug.Gain(db=(3.0, 3.0)), 0.3)])
    applied = np.mean([augment(x, item_id=f"u{i}", step=0) is not x for i in range(1000)])
    assert 0.25 < applied < 0.35
    assert not aug.WaveAugment([(aug.Gain(), 0.0)])
    with pytest.raises(ValueError, match="must be in"):
        aug.WaveAugment([(aug.Gain(), 1.5)])


def test_max_samples_cuts_a_lengthened_utterance():
    x = _speechlike(1.0)
    out = aug.WaveAugment([(aug.SpeedPerturb(factors=(0.9,)), 1.0)], max_samples=15_000)(x, item_id="a", step=0)
    assert out.size == 15_000


# --------------------------------------------------------------------------- the loader


def _corpus(folder, n: int = 8) -> list[Utterance]:
    utts = []
    for i in range(n):
        path = folder / f"{i}.wav"
        sf.write(path, _speechlike(0.5 + 0.05 * i, seed=i), SR)
        utts.append(Utterance(id=f"utt{i}", audio=str(path), duration=0.5 + 0.05 * i, corpus="toy",
                              speaker="s", text=f"words {i}"))
    return utts


def _loader(utts, augment, **kwargs) -> MultiTaskLoader:
    dataset = SpeechTaskDataset(utts, "asr")
    sampler = BatchInterleavedSampler({"asr": dataset.durations}, batch_size=2, seed=0)
    return MultiTaskLoader({"asr": dataset}, sampler, augment=augment, **kwargs)


def _waves(batch) -> list[np.ndarray]:
    return [batch.waveforms[i, :n].numpy() for i, n in enumerate(batch.wave_lengths.tolist())]


def test_the_loader_augments_training_waveforms_alike_in_workers_and_on_resume(tmp_path):
    utts = _corpus(tmp_path)
    augment = aug.WaveAugment([(aug.SpeedPerturb(factors=(0.9, 1.1)), 1.0), (aug.AddNoise(snr_db=(5, 20)), 1.0)],
                              seed=2)
    reference = [_waves(b) for b in _loader(utts, augment)]
    plain = [_waves(b) for b in _loader(utts, None)]
    assert len(reference) == len(plain) == 4
    for ours, clean in zip(reference, plain):
        for a, c in zip(ours, clean):
            assert a.size != c.size  # speed 0.9 or 1.1 on every item

    in_worker = [_waves(b) for b in _loader(utts, augment, num_workers=1)]
    assert all(np.array_equal(a, b) for x, y in zip(in_worker, reference) for a, b in zip(x, y))

    loader = _loader(utts, augment)
    iterator = iter(loader)
    head = [_waves(next(iterator)) for _ in range(2)]
    resumed = _loader(utts, augment)
    resumed.load_state_dict(loader.state_dict())
    tail = [_waves(b) for b in resumed]
    assert all(np.array_equal(a, b) for x, y in zip(head + tail, reference) for a, b in zip(x, y))

    loader.set_epoch(1)  # the next epoch draws anew for the same items
    epoch1 = {i: w for b in loader for i, w in zip(b.ids, _waves(b))}
    epoch0 = {i: w for b, waves in zip(_loader(utts, None), reference) for i, w in zip(b.ids, waves)}
    assert any(epoch1[i].size != epoch0[i].size or not np.array_equal(epoch1[i], epoch0[i]) for i in epoch0)


# --------------------------------------------------------------------------- configuration


def test_the_config_section_is_off_by_default_and_builds_the_transforms_in_order():
    config = load_config(RunConfig)
    assert not config.data.augment.enabled
    assert build_wave_augment(config.data.augment, seed=0) is None
    on = load_config(RunConfig, None, [f"data.augment.{name}.p=0.5" for name in WAVE_AUGMENT_ORDER]
                     + ["model.encoder.trainable=true"])
    augment = build_wave_augment(on.data.augment, seed=0, babble=["x.wav"], max_seconds=20.0)
    assert [t.name for t, _ in augment.steps] == list(WAVE_AUGMENT_ORDER)
    assert augment.max_samples == 20 * SR
    assert isinstance(augment.steps[2][0].babble, aug.Babble)
    with pytest.raises(ConfigError, match="'data.augment.noise.kinds': babble"):
        build_wave_augment(on.data.augment, seed=0, babble=[])
    only_white = WaveAugmentConfig()
    only_white.noise.p, only_white.noise.kinds = 1.0, ["white"]
    assert build_wave_augment(only_white, seed=0).steps[0][0].babble is None


@pytest.mark.parametrize("override, field, problem", [
    ("data.augment.speed.p=1.5", "data.augment.speed.p", "must be in [0, 1]"),
    ("data.augment.speed.factors=[0.9, 3]", "data.augment.speed.factors", "factors in [0.5, 2]"),
    ("data.augment.reverb.rt60=[0.9, 0.2]", "data.augment.reverb.rt60", "min <= max"),
    ("data.augment.noise.snr_db=[0, 30, 40]", "data.augment.noise.snr_db", "[min, max]"),
    ("data.augment.noise.kinds=[traffic]", "data.augment.noise.kinds[0]", "is not one of"),
    ("data.augment.band.bands=[[3400, 300]]", "data.augment.band.bands[0]", "0 <= low < high < 8000"),
    ("data.augment.codec.codecs=[aac]", "data.augment.codec.codecs[0]", "is not one of"),
    ("data.augment.codec.compression=[0.5, 1.0]", "data.augment.codec.compression", "<= 0.95"),
    ("data.augment.gain.db=[-10]", "data.augment.gain.db", "[min, max]"),
    ("data.augment.gain.volume=3", "data.augment.gain.volume", "is unknown"),
])
def test_bad_augment_values_name_the_field(override, field, problem):
    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, [override])
    assert f"'{field}'" in str(error.value) and problem in str(error.value)


def test_augmenting_a_frozen_cached_encoder_is_refused():
    with pytest.raises(ConfigError, match="'data.augment'.*model.encoder.trainable: true or data.feature_cache: \"off\""):
        load_config(RunConfig, None, ["data.augment.noise.p=0.5", "model.encoder.trainable=false"])
    load_config(RunConfig, None, ["data.augment.noise.p=0.5", "model.encoder.trainable=true"])
    load_config(RunConfig, None, ["data.augment.noise.p=0.5", "model.encoder.trainable=false",
                                  "data.feature_cache='off'"])
    # and build_run_data itself, for a DataConfig made without a run config (before any corpus work)
    data = load_config(RunConfig, None, ["data.augment.gain.p=1", "data.feature_cache='off'"]).data
    data.feature_cache = "auto"
    with pytest.raises(ConfigError, match="'data.augment'"):
        build_run_data(data, types.SimpleNamespace(trainable=False), ["neutral"], seed=0)


def test_build_run_data_augments_the_stages_asked_for(tmp_path):
    from harmonifuse.data.manifest import write_manifest

    write_manifest(tmp_path / "asr_train.jsonl", _corpus(tmp_path, n=6))
    overrides = [f"data.root={tmp_path}", "data.train={asr: asr_train.jsonl}", "data.batch_size=2",
                 "model.encoder.trainable=true", "data.augment.gain.p=1", "data.augment.gain.db=[-6, -6]",
                 "data.augment.gain.clip=false"]
    encoder = types.SimpleNamespace(trainable=True)

    def first_batches(extra):
        data = load_config(RunConfig, None, overrides + extra).data
        run = build_run_data(data, encoder, ["neutral"], seed=0, progress=False, align_batch_size=2)
        return next(iter(run.loader)), next(iter(run.align_loader))

    main, align = first_batches([])
    clean = {u.id: sf.read(u.audio, dtype="float32")[0] for u in _corpus(tmp_path, n=6)}
    for batch in (main, align):
        for uid, wave in zip(batch.ids, _waves(batch)):
            assert np.allclose(wave, clean[uid] * 10 ** (-6 / 20), atol=1e-4)
    main, align = first_batches(["data.augment.stages=[align]"])
    assert all(np.array_equal(w, clean[u]) for u, w in zip(main.ids, _waves(main)))
    assert not any(np.array_equal(w, clean[u]) for u, w in zip(align.ids, _waves(align)))
    config = load_config(RunConfig, None, overrides + ["data.augment.stages=[]"])
    assert not config.data.augment.enabled
