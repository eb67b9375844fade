"""From a run's DataConfig to manifests, a feature cache and the batch-interleaved loader."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from harmonifuse.assets import cache_dir
from harmonifuse.atomic import leftovers
from harmonifuse.config import ConfigError
from harmonifuse.config.run import WAVE_AUGMENT_ORDER, DataConfig, WaveAugmentConfig
from harmonifuse.data.augmentation import WaveAugment
from harmonifuse.data.dataset import MultiTaskLoader, SpeechTaskDataset
from harmonifuse.data.feature_cache import FeatureCache
from harmonifuse.data.manifest import Utterance, read_manifest
from harmonifuse.data.sampler import BatchInterleavedSampler

log = logging.getLogger(__name__)


@dataclass
class RunData:
    loader: MultiTaskLoader
    dev: dict[str, list[Utterance]]
    test: dict[str, list[Utterance]]
    cache: FeatureCache | None
    align_loader: MultiTaskLoader | None = None
    """ASR batches for the alignment stage (None without one)."""


def spread_sample(utterances: list[Utterance], limit: int) -> list[Utterance]:
    """A fixed, seeded subset: manifests are often sorted by speaker or label, so never the first N."""
    if len(utterances) <= limit:
        return utterances
    keep = np.sort(np.random.default_rng(0).choice(len(utterances), size=limit, replace=False))
    return [utterances[i] for i in keep]


CORPUS_WAIT = timedelta(hours=24)
"""How long the other ranks wait for rank 0 to synthesise the built-in corpus."""


def ensure_corpus(config: DataConfig, *, progress: bool = True) -> Path:
    """The manifests' folder; synthesises the built-in corpus there when asked and missing.

    Only ever the built-in corpus into its own folder: every configured manifest that is missing
    must be one the built-in corpus writes (``asr_train.jsonl`` for ``data.train.asr``, ...), and
    ``data.root`` must be absent, empty or a built-in corpus (whole or interrupted). Anything else,
    such as a mistyped manifest name in a folder of your own, is a FileNotFoundError naming the
    missing file and its config field; nothing is synthesised.

    Under torchrun (a process group of several ranks; every rank calls this) rank 0 alone builds,
    the others wait for it (on a gloo group of their own, up to :data:`CORPUS_WAIT`) and then read
    what it wrote; an error of rank 0's is raised on every rank.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _ensure_corpus_here(config, progress=progress)
    group = dist.new_group(backend="gloo", timeout=CORPUS_WAIT)  # collective: every rank, before any work
    rank, outcome = dist.get_rank(), [None]
    try:
        if rank == 0:
            try:
                _ensure_corpus_here(config, progress=progress)
            except Exception as error:  # noqa: BLE001 - every rank raises it, not rank 0 alone
                outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=group)
    finally:
        dist.destroy_process_group(group)
    if outcome[0] is not None:
        raise outcome[0]
    if rank == 0:
        return Path(config.root)
    try:
        return _ensure_corpus_here(dataclasses.replace(config, build_synthetic=False), progress=False)
    except FileNotFoundError as error:  # rank 0 found or built them: this rank's node does not see that folder
        raise FileNotFoundError(f"{error} (rank {rank}); rank 0 found or built the manifests in "
                                f"data.root={config.root}, which this process does not see: put data.root on a "
                                "filesystem every node shares, or write the manifests on every node first") from None


def _ensure_corpus_here(config: DataConfig, *, progress: bool) -> Path:
    """:func:`ensure_corpus` in one process."""
    root = Path(config.root)
    missing = {f"data.train.{task}": root / name for task, name in config.train.items()
               if not (root / name).is_file()}
    if not missing:
        return root
    field, path = next(iter(missing.items()))
    if not config.build_synthetic:
        raise FileNotFoundError(f"{field}: training manifest {path} does not exist; run `harmonifuse prepare "
                                f"...` first, or set data.build_synthetic=true for the built-in corpus")
    from harmonifuse.data import synthetic

    splits = {"train": config.train, "dev": config.dev, "test": config.test}
    for split, names in splits.items():
        for task, name in names.items():
            if not (root / name).is_file() and name != synthetic.manifest_name(task, split):
                raise FileNotFoundError(
                    f"data.{split}.{task}: manifest {root / name} does not exist, and it is not a manifest "
                    f"of the built-in corpus ({synthetic.manifest_name(task, split)}), so nothing is "
                    f"synthesised; correct the name, or run `harmonifuse prepare ...` to write it")
    if not _holds_only_a_synthetic_corpus(root, synthetic.PLAN_FILE):
        raise FileNotFoundError(
            f"{field}: manifest {path} does not exist, and data.root={root} holds other files but no "
            f"built-in corpus ({synthetic.PLAN_FILE}), so the built-in corpus is not synthesised into it; "
            f"correct data.root or the manifest names, or write the manifests with `harmonifuse prepare ...`")
    log.warning("building the built-in synthetic corpus in %s (once)", root)
    synthetic.prepare(root, size=config.synthetic_size, voices=config.synthetic_voices, progress=progress)
    return root


def _holds_only_a_synthetic_corpus(root: Path, plan_file: str) -> bool:
    """``root`` is absent, empty (but for temp files), or a folder the synthesiser made (its plan
    file is there; another process may be writing it right now)."""
    if not root.exists():
        return True
    return root.is_dir() and ((root / plan_file).is_file() or set(root.iterdir()) <= set(leftovers(root)))


def read_split(root: Path, split: dict[str, str], labels: list[str]) -> dict[str, list[Utterance]]:
    out = {}
    for task, name in split.items():
        path = root / name
        if path.is_file():
            out[task] = [u for u in read_manifest(path, labels=labels) if u.has_task(task)]
    return out


def mix_in(base: list[Utterance], sources: Sequence[tuple[list[Utterance], float]], *,
           seed: int) -> list[Utterance]:
    """``base`` plus each source's utterances repeated and/or subsampled so that each source makes
    up its share of the result (in count; seeded, so every rank and every resume draws the same)."""
    room = 1.0 - sum(share for _, share in sources)
    rng = np.random.default_rng(seed)
    out = list(base)
    for utterances, share in sources:
        if not utterances:
            continue
        wanted = round(share / room * len(base)) if base else len(utterances)
        copies, rest = divmod(wanted, len(utterances))
        out += utterances * copies
        out += [utterances[i] for i in np.sort(rng.choice(len(utterances), size=rest, replace=False))]
    return out


def _mix_path(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def read_mix(config: DataConfig, root: Path, labels: list[str], train: dict[str, list[Utterance]],
             dev: dict[str, list[Utterance]], *, seed: int) -> None:
    """Draw ``data.mix``'s sources into ``train`` (at their shares) and ``dev`` (``data.dev_limit``
    split evenly over the task's sources), in place."""
    for task, sources in config.mix.items():
        drawn, devs = [], [dev.get(task, [])]
        for i, source in enumerate(sources):
            field = f"data.mix.{task}[{i}]"
            for split in ("train", "dev"):
                name = getattr(source, split)
                if name and not _mix_path(root, name).is_file():
                    raise FileNotFoundError(f"{field}.{split}: manifest {_mix_path(root, name)} does not exist; "
                                            f"write it first (e.g. `harmonifuse prepare real-speech DIR`)")
            utterances = [u for u in read_manifest(_mix_path(root, source.train), labels=labels) if u.has_task(task)]
            if not utterances:
                raise ValueError(f"{field}.train: {source.train} has no utterance labelled for {task}")
            drawn.append((utterances, source.share))
            if source.dev:
                devs.append([u for u in read_manifest(_mix_path(root, source.dev), labels=labels)
                             if u.has_task(task)])
        train[task] = mix_in(train[task], drawn, seed=seed)
        share = max(1, config.dev_limit // len(devs))
        dev[task] = [u for utts in devs for u in spread_sample(utts, share)]


def uses_feature_cache(setting: str, device: torch.device | str) -> bool:
    """Whether ``data.feature_cache`` caches on ``device``: "auto" on the CPU only (on CUDA the frozen
    encoder runs in the forward pass instead); a folder always; "off" never."""
    if setting == "off":
        return False
    return setting != "auto" or torch.device(device).type == "cpu"


def _encoder_device(encoder) -> torch.device:
    parameters = getattr(encoder, "parameters", None)
    first = next(parameters(), None) if parameters is not None else None
    return first.device if first is not None else torch.device("cpu")


def feature_cache_for(encoder, config: DataConfig, device: torch.device | str | None = None) -> FeatureCache | None:
    """The feature cache of a frozen ``encoder`` running on ``device`` (default: where its parameters
    are), or None: a trainable encoder, or ``data.feature_cache`` saying no (:func:`uses_feature_cache`)."""
    device = torch.device(device) if device is not None else _encoder_device(encoder)
    if encoder.trainable or not uses_feature_cache(config.feature_cache, device):
        return None
    root = cache_dir() / "features" if config.feature_cache == "auto" else Path(config.feature_cache)
    return FeatureCache(encoder, root, load_kwargs={"max_seconds": config.max_seconds}, device=device)


def cached_utterances(config: DataConfig, train: dict[str, list[Utterance]],
                      dev: dict[str, list[Utterance]]) -> list[Utterance]:
    """What a run reads from the feature cache: every training utterance and the dev utterances
    scored during training (``data.dev_limit`` per task, :func:`spread_sample`)."""
    dev = {task: spread_sample(utts, config.dev_limit) for task, utts in dev.items()}
    return [u for split in (train, dev) for utts in split.values() for u in utts]


def build_wave_augment(config: WaveAugmentConfig, *, seed: int, babble: Sequence[str] = (),
                       sample_rate: int = 16_000, max_seconds: float | None = None) -> WaveAugment | None:
    """The waveform augmentation ``data.augment`` asks for (None when every transform is off).

    Args:
        babble: audio files babble noise is made of (the training utterances); needed when
            ``noise.kinds`` has "babble".
        max_seconds: cut augmented waveforms to this length (speed 0.9 lengthens them).
    """
    if not config.enabled:
        return None
    from harmonifuse.data import augmentation as aug

    def make(name: str):
        section = getattr(config, name)
        if name == "speed":
            return aug.SpeedPerturb(tuple(section.factors), sample_rate=sample_rate)
        if name == "reverb":
            return aug.Reverb(tuple(section.rt60), tuple(section.drr_db), sample_rate=sample_rate)
        if name == "noise":
            source = None
            if "babble" in section.kinds:
                if not babble:
                    raise ConfigError("config field 'data.augment.noise.kinds': babble needs training utterances "
                                      "to be made of, and there are none")
                source = aug.Babble(list(babble), tuple(section.babble_talkers), sample_rate=sample_rate,
                                    max_seconds=max_seconds)
            return aug.AddNoise(tuple(section.snr_db), tuple(section.kinds), source)
        if name == "band":
            return aug.BandLimit(tuple(tuple(b) for b in section.bands), sample_rate=sample_rate)
        if name == "codec":
            missing = [c for c in section.codecs if c not in aug.available_codecs()]
            if missing:
                raise ConfigError(f"config field 'data.augment.codec.codecs': this libsndfile cannot write "
                                  f"{missing}; it writes {aug.available_codecs()}")
            return aug.CodecRoundTrip(tuple(section.codecs), tuple(section.compression), sample_rate=sample_rate)
        return aug.Gain(tuple(section.db), section.clip)

    steps = [(make(name), getattr(config, name).p) for name in WAVE_AUGMENT_ORDER if getattr(config, name).p > 0]
    return WaveAugment(steps, seed=seed,
                       max_samples=int(max_seconds * sample_rate) if max_seconds else None)


def build_run_data(config: DataConfig, encoder, labels: list[str], *, seed: int, rank: int = 0,
                   world_size: int = 1, progress: bool = True, num_workers: int = 0, pin_memory: bool = False,
                   align_batch_size: int = 0, align_tasks: Sequence[str] = ("asr",)) -> RunData:
    """Manifests, feature cache and loaders; ``align_batch_size > 0`` adds the alignment stage's
    loader over ``align_tasks`` (interleaved by the main schedule when there are several)."""
    device = _encoder_device(encoder)  # the model is where training runs before this is called
    if config.augment.enabled and not encoder.trainable and uses_feature_cache(config.feature_cache, device):
        raise ConfigError("config field 'data.augment': waveform augmentation is on, but the frozen encoder's "
                          "features are cached, so training batches hold no waveforms; set "
                          "model.encoder.trainable: true or data.feature_cache: \"off\" (quoted)")
    root = ensure_corpus(config, progress=progress and rank == 0)
    train = read_split(root, config.train, labels)
    dev = read_split(root, config.dev, labels)
    test = read_split(root, config.test, labels)
    dev = {task: spread_sample(utts, config.dev_limit) for task, utts in dev.items()}
    read_mix(config, root, labels, train, dev, seed=seed)
    cache = feature_cache_for(encoder, config, device)
    if cache is not None:  # every rank its share, then all meet (a long wait: a gloo group of its own)
        from harmonifuse.training.feature_cache_build import CACHE_FIRST_HINT, build_shared

        everything = cached_utterances(config, train, dev)
        summary = build_shared(cache, everything, rank=rank, world_size=world_size, progress=progress,
                               hint=CACHE_FIRST_HINT)
        if summary["overall"]["computed"] and rank == 0:
            log.info("feature cache %s: %s", cache.folder, summary["overall"])
    datasets = {task: SpeechTaskDataset(utts, task, cache=cache, load_kwargs={"max_seconds": config.max_seconds},
                                        on_error=config.bad_samples) for task, utts in train.items()}
    babble = sorted({u.audio for utts in train.values() for u in utts})
    augment = build_wave_augment(config.augment, seed=seed, babble=babble, max_seconds=config.max_seconds)
    if augment is not None:
        log.info("waveform augmentation on training batches (%s): %s", ", ".join(config.augment.stages),
                 ", ".join(f"{t.name} p={p:g}" for t, p in augment.steps))

    def loader_for(tasks: list[str], batch_size: int, schedule: dict, limit: dict, fraction: dict,
                   stage: str) -> MultiTaskLoader:
        sampler = BatchInterleavedSampler(
            {task: datasets[task].durations for task in tasks}, batch_size=batch_size,
            max_duration=config.max_duration or None, schedule=schedule, seed=seed,
            pool_size=config.pool_size or None, rank=rank, world_size=world_size,
            limit=limit or None, fraction=fraction or None)
        return MultiTaskLoader({task: datasets[task] for task in tasks}, sampler, num_workers=num_workers,
                               pin_memory=pin_memory,
                               augment=augment if stage in config.augment.stages else None, stage=stage)

    loader = loader_for(list(datasets), config.batch_size, {"name": config.schedule, **config.schedule_options},
                        dict(config.limit), dict(config.fraction), "main")
    align_loader = None
    if align_batch_size:
        missing = [t for t in align_tasks if t not in datasets]
        if missing:
            raise ValueError(f"the alignment stage (align.max_steps > 0) trains on model.ctc.tasks "
                             f"{list(align_tasks)}, but data.train has no manifest for {missing}; add one, "
                             f"drop the task from model.ctc.tasks, or set align.max_steps=0")
        schedule = ({"name": config.schedule, **config.schedule_options} if len(align_tasks) > 1
                    else {"name": "round_robin"})
        # the same subsets as the main stage, so a limited-data arm stays limited
        align_loader = loader_for(list(align_tasks), align_batch_size, schedule,
                                  {t: n for t, n in config.limit.items() if t in align_tasks},
                                  {t: f for t, f in config.fraction.items() if t in align_tasks}, "align")
    return RunData(loader, dev, test, cache, align_loader)
