"""Disk cache of a frozen encoder's hidden states: compute once, memory-map forever after.

With the encoder frozen (the default), its output for an utterance never changes, yet computing
it is most of a training step's cost. :class:`FeatureCache` stores *all* ``L+1`` hidden states
of every utterance as float16 ``.npy`` files (valid frames only, no padding) and serves them with
``np.load(mmap_mode="r")``.

Layout::

    root/<encoder identity slug>-<sha256(identity)[:12]>/
        meta.json                   identity, L+1, D, frame rate (for humans; not trusted)
        ab/abcdef....npy            (L+1, T, D) float16, one file per distinct audio content,
                                    then a 16-byte trailer: b"HFcrc32\\0", the CRC-32 of the array's
                                    bytes (little-endian), 4 zero bytes (np.load ignores it)

Keys. A file's key is ``sha256(load parameters + the audio file's bytes)``, so editing or
replacing the audio changes the key (a miss, then a recompute); the folder is chosen by
``encoder.identity``, so a different encoder (or feature recipe) never sees another's features.
Stale files are never read and can be deleted with the folder. Hashing a file is cheap next to
decoding it; the key is memoised per (path, size, mtime) within a process.

Building. :meth:`FeatureCache.build` computes what is missing in duration-sorted batches; under
torchrun each rank builds its own share (:func:`share_of`: the distinct audio files, dealt out by
index modulo the world size), so N processes build N disjoint parts of the same folder
(``harmonifuse cache CONFIG``, and training when the cache is incomplete:
:mod:`harmonifuse.training.feature_cache_build`).

Writes are atomic (:mod:`harmonifuse.atomic`: a temp file in the same folder, then a rename), so concurrent workers
and interrupted builds never leave a half-written file under a real key; a file that still
fails to load, has the wrong shape or size (truncated), or whose bytes no longer match their
checksum (damaged on disk) is treated as a miss, with a warning, and rewritten. Files are
size-checked at every lookup and checksummed when read (:meth:`FeatureCache.get`); files written
before the trailer existed are accepted on their size alone.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch

from harmonifuse.atomic import atomic_write, atomic_write_text
from harmonifuse.modules.encoders.base import SpeechEncoder

__all__ = ["FeatureCache", "share_of"]

log = logging.getLogger(__name__)

_KEY_VERSION = b"harmonifuse-feature-cache-v1"
_FP16_MAX = 65504.0
_CHUNK = 1 << 20
_TRAILER_MAGIC = b"HFcrc32\0"
_TRAILER_SIZE = 16


class _HasAudio(Protocol):
    id: str
    audio: str
    duration: float


Source = Union[_HasAudio, str, os.PathLike, None]


def _audio_path(source: Source) -> str | None:
    if source is None:
        return None
    return os.path.abspath(os.fspath(getattr(source, "audio", source)))


class FeatureCache:
    """Hidden states of a frozen ``encoder``, stored under ``root``.

    Args:
        encoder: a frozen :class:`SpeechEncoder` (``trainable=False``); its ``identity`` names
            the cache folder.
        root: the cache root (one subfolder per encoder identity).
        sample_rate: audio is decoded at this rate (default ``encoder.sample_rate``); part of
            the key.
        load_kwargs: extra :func:`harmonifuse.audio.load_audio` arguments (``max_seconds``,
            ``min_seconds``, ...). They only accept or reject files, so they are not in the key.
        device: where the encoder runs (default: where its parameters are).

    Attributes:
        hits, misses: lookups served from disk vs computed (by :meth:`get` and :meth:`build`),
            per process (each DataLoader worker counts its own).
    """

    def __init__(self, encoder: SpeechEncoder, root: str | os.PathLike, *, sample_rate: int | None = None,
                 load_kwargs: Mapping[str, Any] | None = None, device: str | torch.device | None = None) -> None:
        if getattr(encoder, "trainable", False):
            raise ValueError("a feature cache needs a frozen encoder (trainable=False): "
                             "a trained encoder's features change every step")
        self.encoder = encoder
        self.sample_rate = int(sample_rate or encoder.sample_rate)
        self.load_kwargs = dict(load_kwargs or {})
        if device is None:
            parameter = next(encoder.parameters(), None)
            device = parameter.device if parameter is not None else "cpu"
        self.device = torch.device(device)
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", encoder.identity).strip("_")[:60]
        digest = hashlib.sha256(encoder.identity.encode()).hexdigest()[:12]
        self.folder = Path(root) / f"{slug}-{digest}"
        self.hits = 0
        self.misses = 0
        self._key_memo: dict[tuple[str, int, int], str] = {}

    # ------------------------------------------------------------------ keys and paths
    def key(self, source: Source, waveform: np.ndarray | None = None) -> str:
        """Content key of an utterance / audio path, or of ``waveform`` alone if ``source`` is None."""
        path = _audio_path(source)
        h = hashlib.sha256(_KEY_VERSION + f"|sr={self.sample_rate}|".encode())
        if path is None:
            if waveform is None:
                raise ValueError("give an utterance, an audio path or a waveform")
            h.update(b"waveform|" + np.ascontiguousarray(waveform, dtype=np.float32).tobytes())
            return h.hexdigest()
        try:
            stat = os.stat(path)
            memo = (path, stat.st_size, stat.st_mtime_ns)
            if memo not in self._key_memo:
                h.update(b"file|")
                with open(path, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        h.update(chunk)
                self._key_memo[memo] = h.hexdigest()
        except OSError as error:  # one error type for every unusable sample
            from harmonifuse.audio import AudioError

            raise AudioError(path, f"cannot read audio file ({error.strerror or error})",
                             "check the path, or remove it from the manifest") from error
        return self._key_memo[memo]

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def __contains__(self, source: Source) -> bool:
        return self._read(self.path_for(self.key(source))) is not None

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    # ------------------------------------------------------------------ lookup
    def get(self, source: Source, waveform: np.ndarray | None = None) -> torch.Tensor:
        """Hidden states ``(L+1, T, D)`` float16 of one utterance (its valid frames only).

        Args:
            source: an :class:`~harmonifuse.data.manifest.Utterance`, an audio path, or None.
            waveform: the already decoded ``(S,)`` audio, used on a miss instead of loading the
                file (the key still comes from the file); with ``source=None`` the key is the
                waveform's content.

        Raises:
            AudioError: the audio file is missing, or (on a miss) cannot be loaded.
        """
        array = self.read(source, waveform)
        # a hit: a writable copy out of the memmap (which it closes); a miss: the computed array itself
        return torch.from_numpy(np.array(array) if isinstance(array, np.memmap) else array)

    def read(self, source: Source, waveform: np.ndarray | None = None) -> np.ndarray:
        """:meth:`get` without the copy: the stored ``(L+1, T, D)`` float16 array memory-mapped
        read-only (a hit, checksummed), or the freshly computed one (a miss, written first).

        What the training batches read: :func:`~harmonifuse.data.batch.pad_hidden_states` copies it
        straight from the page cache into the padded float16 batch, the only copy on the host.
        """
        key = self.key(source, waveform)
        stored = self._read(self.path_for(key), verify=True)
        if stored is not None:
            self.hits += 1
            return stored
        self.misses += 1
        if waveform is None:
            waveform = self._load(_audio_path(source))
        features = self.compute([waveform])[0]
        self._write(key, features)
        return features

    def build(self, utterances: Iterable[_HasAudio], batch_size: int = 8, progress: bool = True,
              on_error: str = "fail", *, rank: int = 0, world_size: int = 1,
              hint: str | None = None) -> dict[str, int]:
        """Compute and store the features of every utterance not cached yet.

        Misses are sorted by duration and run in batches of ``batch_size`` similar lengths, so
        little compute goes to padding. With ``on_error="skip"`` unloadable audio is logged and
        counted instead of raised (the dataset's bad-sample policy meets it again later).

        ``rank`` of ``world_size`` processes: only this process's share (:func:`share_of`); the
        shares of all ranks are disjoint and cover every utterance. ``hint`` is logged (a warning)
        when there is anything to compute.

        Returns:
            ``{"total", "cached", "computed", "failed"}`` counts (duplicate audio counts once).
        """
        from tqdm.auto import tqdm

        from harmonifuse.audio import AudioError, BadSamplePolicy

        policy = BadSamplePolicy(on_error)
        todo: dict[str, _HasAudio] = {}
        seen: set[str] = set()
        total = cached = 0  # distinct audio (by key, plus files that cannot even be hashed)
        for utterance in tqdm(share_of(list(utterances), rank, world_size), desc="hashing audio",
                              disable=not progress, leave=False):
            try:
                key = self.key(utterance)
            except AudioError as error:  # missing file: the policy decides
                policy.handle(utterance.audio, error)
                total += 1
                continue
            if key in seen:
                continue
            seen.add(key)
            total += 1
            if self._read(self.path_for(key)) is not None:
                cached += 1
                self.hits += 1
            else:
                todo[key] = utterance
        ordered = sorted(todo.items(), key=lambda item: item[1].duration)
        if ordered and hint:
            log.warning("%s (%d to compute here)", hint, len(ordered))
        computed = 0
        with tqdm(total=len(ordered), desc=f"caching {self.encoder.identity}", unit="utt",
                  disable=not progress) as bar:
            for start in range(0, len(ordered), batch_size):
                batch = ordered[start:start + batch_size]
                loaded = [(key, policy.load(u.audio, sample_rate=self.sample_rate, **self.load_kwargs))
                          for key, u in batch]
                loaded = [(key, wave) for key, wave in loaded if wave is not None]
                if loaded:
                    for (key, _), features in zip(loaded, self.compute([w for _, w in loaded])):
                        self._write(key, features)
                    computed += len(loaded)
                    self.misses += len(loaded)
                bar.update(len(batch))
        failed = policy.counter.count
        if failed:
            log.warning("feature cache: %s", policy.counter.summary())
        return {"total": total, "cached": cached, "computed": computed, "failed": failed}

    # ------------------------------------------------------------------ computing
    @torch.inference_mode()
    def compute(self, waveforms: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the encoder on a list of ``(S_i,)`` waveforms -> list of ``(L+1, T_i, D)`` float16."""
        lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
        padded = torch.zeros(len(waveforms), int(lengths.max()), dtype=torch.float32)
        for i, wave in enumerate(waveforms):
            padded[i, : len(wave)] = torch.as_tensor(wave, dtype=torch.float32)
        out = self.encoder(padded.to(self.device), lengths.to(self.device))
        hidden = out.hidden_states.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).cpu()  # (L+1, B, T, D)
        frames = out.lengths.cpu().tolist()
        return [hidden[:, i, : int(n)].numpy().copy() for i, n in enumerate(frames)]

    def _load(self, path: str | None) -> np.ndarray:
        from harmonifuse.audio import load_audio

        return load_audio(path, sample_rate=self.sample_rate, **self.load_kwargs)

    # ------------------------------------------------------------------ storage
    def _read(self, path: Path, verify: bool = False) -> np.ndarray | None:
        """The stored (L+1, T, D) memmap, or None if absent, unreadable, the wrong shape or size, or
        (``verify``: its bytes checked) damaged."""
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:  # truncated / corrupt: recompute and overwrite
            log.warning("feature cache: unreadable %s (%s); recomputing", path, error)
            return None
        expected = (self.encoder.num_hidden_states, self.encoder.hidden_size)
        if array.ndim != 3 or (array.shape[0], array.shape[2]) != expected or array.dtype != np.float16:
            log.warning("feature cache: %s has shape %s %s, expected (%d, T, %d) float16; recomputing",
                        path, array.shape, array.dtype, *expected)
            return None
        problem = _check_trailer(path, array, verify)
        if problem:
            log.warning("feature cache: %s %s; recomputing", path, problem)
            return None
        return array

    def _write(self, key: str, features: np.ndarray) -> None:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        array = np.ascontiguousarray(features, dtype=np.float16)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a handle: np.save would append ".npy" to a path
                np.save(handle, array, allow_pickle=False)
                handle.write(_TRAILER_MAGIC + (zlib.crc32(array.data) & 0xFFFFFFFF).to_bytes(4, "little")
                             + bytes(4))

        atomic_write(path, write)

    def _write_meta(self) -> None:
        meta = self.folder / "meta.json"
        if meta.exists():
            return
        info = {"identity": self.encoder.identity, "num_hidden_states": self.encoder.num_hidden_states,
                "hidden_size": self.encoder.hidden_size, "frame_rate": self.encoder.frame_rate,
                "sample_rate": self.sample_rate, "dtype": "float16"}
        atomic_write_text(meta, json.dumps(info, indent=2) + "\n")


def share_of(utterances: Sequence[_HasAudio], rank: int, world_size: int) -> list[_HasAudio]:
    """The utterances process ``rank`` of ``world_size`` caches: those whose audio file is at an index
    ``rank`` modulo ``world_size`` among the distinct audio files, in order of first appearance.

    Every process reads the same manifests, so the shares are disjoint and cover everything, and an
    audio file listed twice (in train and dev, under two tasks) lands in one share. A process only
    hashes its own share's files."""
    if world_size <= 1:
        return list(utterances)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    index: dict[str, int] = {}
    for utterance in utterances:
        index.setdefault(utterance.audio, len(index))
    return [u for u in utterances if index[u.audio] % world_size == rank]


def _check_trailer(path: Path, array: np.memmap, verify: bool) -> str | None:
    """What is wrong with a stored file's size or checksum trailer, or None when it is whole."""
    data_end = array.offset + array.nbytes
    try:
        size = os.path.getsize(path)
        if size == data_end:  # written before checksums: its size is all there is to check
            return None
        if size != data_end + _TRAILER_SIZE:
            return f"has {size} bytes, expected {data_end + _TRAILER_SIZE} (truncated or damaged)"
        with open(path, "rb") as handle:
            handle.seek(data_end)
            trailer = handle.read(_TRAILER_SIZE)
    except OSError as error:
        return f"cannot be read ({error})"
    if trailer[:8] != _TRAILER_MAGIC:
        return "has a damaged checksum trailer"
    if verify and (zlib.crc32(np.ascontiguousarray(array).data) & 0xFFFFFFFF) != int.from_bytes(trailer[8:12], "little"):
        return "does not match its checksum (damaged on disk)"
    return None
