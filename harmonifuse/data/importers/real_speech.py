"""The real-speech corpus: human voices with their text, built offline from two Debian games.

``harmonifuse prepare real-speech OUT`` fetches the pinned Debian packages
``flight-of-the-amazon-queen`` 1.0.0-9 and ``drascula`` 1.0+ds4-2 (:mod:`.debian_packages`:
``apt-get download``, sha256, ``dpkg-deb -x``; nothing is installed), extracts their voiced
dialogue (:mod:`.amazon_queen`, :mod:`.drascula`) and writes ASR manifests::

    OUT/real_asr_train.jsonl   FOTAQ (train characters, and Joe) + Drascula (pairs not marked noisy)
    OUT/real_asr_dev.jsonl     FOTAQ, held-out characters (about 10-15 minutes)
    OUT/real_asr_test.jsonl    FOTAQ, other held-out characters (at least 30 minutes)
    OUT/amazon-queen/, OUT/drascula/   the clips and each corpus's full manifest and counts
    OUT/README.md, OUT/LICENSE-*.txt, OUT/README-*.txt, OUT/summary.json

Game dialogue recorded by actors: real voices, acted, narrowband (11,025 Hz: nothing above
5.5 kHz), no emotion labels. Redistributable freeware, not for sale (the licences are copied
beside the manifests); the audio must not be committed to this repository.

**Split** (deterministic, :func:`split_fotaq`): characters and dialogue files form groups (a
character with every dialogue file it speaks in; the player's character Joe, who speaks in every
dialogue, links nothing). Groups are taken in the order of a seeded hash of their characters;
test takes groups until it holds ``test_minutes`` (30), then dev until ``dev_minutes`` (10, at
most 15); groups over ``max_group_minutes`` (8) stay in train. Dev and test hold the held-out
characters' lines; Joe's lines in their dialogues are dropped (they would put those dialogues in
train), his other lines train. So no dev or test character and no dev or test dialogue file
appears in train. Drascula enters train only, without the pairs its importer marked noisy.
A character is not an actor: one voice actor may play several characters in a game.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from harmonifuse.atomic import atomic_write_text
from harmonifuse.data.importers import amazon_queen, debian_packages, drascula
from harmonifuse.data.importers.amazon_queen import JOE, write_jsonl

log = logging.getLogger("harmonifuse.data.importers")

MANIFESTS = {"train": "real_asr_train.jsonl", "dev": "real_asr_dev.jsonl", "test": "real_asr_test.jsonl"}
FOTAQ = "flight-of-the-amazon-queen"
DRASCULA = "drascula"
SPLIT_SEED = "harmonifuse-real-speech-1"
TEST_MINUTES = 30.0
DEV_MINUTES = (10.0, 15.0)
MAX_GROUP_MINUTES = 8.0


def _groups(records: list[dict], shared: str) -> list[tuple[frozenset[str], frozenset[str]]]:
    """Connected groups of (speakers, sessions) linked by the lines of every speaker but ``shared``."""
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for record in records:
        if record["speaker"] != shared:
            a, b = find("s:" + record["speaker"]), find("d:" + str(record.get("session")))
            parent[a] = b
    members: dict[str, set[str]] = defaultdict(set)
    for node in list(parent):
        members[find(node)].add(node)
    return [(frozenset(n[2:] for n in nodes if n.startswith("s:")),
             frozenset(n[2:] for n in nodes if n.startswith("d:"))) for nodes in members.values()]


def split_fotaq(records: list[dict], *, test_minutes: float = TEST_MINUTES,
                dev_minutes: tuple[float, float] = DEV_MINUTES, max_group_minutes: float = MAX_GROUP_MINUTES,
                seed: str = SPLIT_SEED, shared: str = JOE) -> dict[str, list[dict]]:
    """``{"train", "dev", "test", "dropped"}`` lists of records; see the module doc. Raises
    ValueError when the held-out groups cannot reach ``test_minutes``."""
    minutes: dict[frozenset, float] = {}
    speakers_minutes: dict[str, float] = defaultdict(float)
    for record in records:
        speakers_minutes[record["speaker"]] += record["duration"] / 60
    groups = _groups(records, shared)
    for speakers, _ in groups:
        minutes[speakers] = sum(speakers_minutes[s] for s in speakers)

    def order(group: tuple[frozenset[str], frozenset[str]]) -> str:
        return hashlib.sha256(f"{seed}:{','.join(sorted(group[0]))}".encode()).hexdigest()

    held: dict[str, list[tuple[frozenset[str], frozenset[str]]]] = {"test": [], "dev": []}
    total = {"test": 0.0, "dev": 0.0}
    for group in sorted(groups, key=order):
        size = minutes[group[0]]
        if size > max_group_minutes:
            continue
        if total["test"] < test_minutes:
            split = "test"
        elif total["dev"] < dev_minutes[0] and total["dev"] + size <= dev_minutes[1]:
            split = "dev"
        else:
            continue
        held[split].append(group)
        total[split] += size
    if total["test"] < test_minutes:
        raise ValueError(f"real-speech: the held-out characters make only {total['test']:.1f} of the "
                         f"{test_minutes} test minutes; lower test_minutes or raise max_group_minutes")
    speaker_split = {s: split for split, gs in held.items() for g in gs for s in g[0]}
    session_split = {d: split for split, gs in held.items() for g in gs for d in g[1]}
    out: dict[str, list[dict]] = {"train": [], "dev": [], "test": [], "dropped": []}
    for record in records:
        split = speaker_split.get(record["speaker"]) or session_split.get(str(record.get("session")))
        if split is None:
            out["train"].append(record)
        elif record["speaker"] == shared:
            out["dropped"].append(record)
        else:
            out[split].append(record)
    return out


def summarize(records: Iterable[dict]) -> dict:
    records = list(records)
    speakers = sorted({r["speaker"] for r in records})
    return {"clips": len(records), "minutes": round(sum(r["duration"] for r in records) / 60, 1),
            "words": sum(len(r["text"].split()) for r in records), "speakers": len(speakers),
            "speaker_ids": speakers}


def _read(path: Path, prefix: str) -> list[dict]:
    """Records of a corpus manifest, audio paths made relative to the folder above it."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for record in records:
        record["audio"] = f"{prefix}/{record['audio']}"
    return records


def prepare(out: Path, *, cache: Path | None = None, agreement: str | drascula.Agreement | None = "whisper",
            max_cer: float = drascula.MAX_CER, progress_bar: bool = True) -> dict[str, Path]:
    """Fetch both games, extract their dialogue and write the split manifests (module doc).

    ``cache``: where the .deb files are kept and unpacked (default ``$HARMONIFUSE_CACHE/debian``).
    ``agreement``/``max_cer``: how Drascula's noisy pairs are found (:func:`drascula.prepare`;
    ``"whisper"`` runs Whisper tiny.en over its ~740 clips once, reused on re-runs; None: the
    length check only). Re-running reuses the packages, the extracted clips and the agreement
    values, and rewrites the manifests atomically. Returns ``{"train", "dev", "test": path}``.
    """
    out = Path(os.path.abspath(out))
    out.mkdir(parents=True, exist_ok=True)
    roots = {name: debian_packages.fetch(name, cache) for name in (FOTAQ, DRASCULA)}
    fotaq = amazon_queen.prepare(roots[FOTAQ] / debian_packages.PACKAGES[FOTAQ].data, out / "amazon-queen",
                                 progress_bar=progress_bar)["all"]
    game = drascula.prepare(roots[DRASCULA] / debian_packages.PACKAGES[DRASCULA].data, out / "drascula",
                            agreement=agreement, max_cer=max_cer, progress_bar=progress_bar)["all"]
    for name, root in roots.items():
        debian_packages.copy_notices(name, root, out)
    splits = split_fotaq(_read(fotaq, "amazon-queen"), test_minutes=TEST_MINUTES, dev_minutes=DEV_MINUTES,
                         max_group_minutes=MAX_GROUP_MINUTES, seed=SPLIT_SEED)
    dras = _read(game, "drascula")
    splits["train"] += [r for r in dras if not r["noisy"]]
    splits["dropped"] += [r for r in dras if r["noisy"]]
    written = {split: write_jsonl(out / name, splits[split]) for split, name in MANIFESTS.items()}
    summary = {split: summarize(splits[split]) for split in (*MANIFESTS, "dropped")}
    summary["train"]["drascula"] = summarize(r for r in splits["train"] if r["corpus"] == drascula.CORPUS)
    summary["settings"] = {"seed": SPLIT_SEED, "test_minutes": TEST_MINUTES, "dev_minutes": DEV_MINUTES,
                           "max_group_minutes": MAX_GROUP_MINUTES, "drascula_agreement":
                           agreement if isinstance(agreement, str) or agreement is None else "custom",
                           "drascula_max_cer": max_cer}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "README.md", notice(summary))
    print(format_summary(summary))
    return written


def format_summary(summary: dict) -> str:
    lines = [f"{'split':<8} {'clips':>6} {'minutes':>8} {'words':>7} {'speakers':>9}"]
    for split in (*MANIFESTS, "dropped"):
        s = summary[split]
        lines.append(f"{split:<8} {s['clips']:>6} {s['minutes']:>8.1f} {s['words']:>7} {s['speakers']:>9}")
    for split in ("dev", "test"):
        lines.append(f"{split} speakers: {', '.join(summary[split]['speaker_ids'])}")
    return "\n".join(lines)


def notice(summary: dict) -> str:
    """OUT/README.md: what the corpus is, where it comes from, its licence and how it is split."""
    settings = summary["settings"]
    if settings["drascula_agreement"] is None:
        filter_text = ("only the length check was run (built without Whisper): each pair carries `noisy` "
                       "(text of implausible length for its audio)")
    else:
        filter_text = (f"each pair carries `agreement`, the CER of Whisper tiny.en's own greedy decoding against "
                       f"the subtitle, and `noisy` (agreement above {settings['drascula_max_cer']} or implausible "
                       "length)")
    rows = "\n".join(f"| {split} | {summary[split]['clips']} | {summary[split]['minutes']} | {summary[split]['words']} "
                     f"| {summary[split]['speakers']} |" for split in (*MANIFESTS, "dropped"))
    return f"""# Real-speech corpus (built by `harmonifuse prepare real-speech`)

Human voices with their text: the voiced dialogue of two freeware adventure games, extracted
from Debian packages at prepare time. **Modified version**: the games' speech files were cut
out of their archives (Flight of the Amazon Queen: the original MP3 bytes; Drascula: 8-bit PCM
converted to 16-bit FLAC with leading and trailing silence trimmed) and paired with their
subtitles; nothing else was changed.

| source | Debian package | here | licence |
|---|---|---|---|
| Flight of the Amazon Queen (1995, John Passfield, Steven Stamatiadis) | `flight-of-the-amazon-queen` 1.0.0-9 \
| `amazon-queen/` | LICENSE-flight-of-the-amazon-queen.txt |
| Drascula: The Vampire Strikes Back (1996, Alcachofa Soft S.L.) | `drascula` 1.0+ds4-2 | `drascula/` \
| LICENSE-drascula.txt |

Both licences allow free redistribution with the readme and notices intact (kept here as
`LICENSE-*.txt` and `README-*.txt`) and forbid selling the games. Do not commit the audio to a
source repository; rebuild it with `harmonifuse prepare real-speech DIR`.

**Narrowband**: 11,025 Hz (nothing above 5.5 kHz); HarmoniFuse resamples to 16 kHz on load.
Acted game dialogue, not conversational speech; no emotion labels.

| split | clips | minutes | words | speakers |
|---|---|---|---|---|
{rows}

`dropped`: Joe's lines inside held-out dialogues and Drascula's noisy pairs (in no manifest).
Speakers are game characters (`fotaq-*`, `drascula-*`); one voice actor may play several.
Dev speakers: {', '.join(summary['dev']['speaker_ids'])}.
Test speakers: {', '.join(summary['test']['speaker_ids'])}.

**Split**: dev and test are Flight of the Amazon Queen only, by character and by dialogue file:
a held-out character's dialogue files are held out whole, so no dev/test character and no
dev/test dialogue appears in train. The player's character Joe (in every dialogue) trains only;
his lines inside held-out dialogues are dropped. Characters are drawn in the order of a seeded
hash (seed `{SPLIT_SEED}`) until test holds {TEST_MINUTES:g} minutes and dev {DEV_MINUTES[0]:g}-{DEV_MINUTES[1]:g};
characters with more than {MAX_GROUP_MINUTES:g} minutes stay in train. Drascula is train only.

**Text** is normalised as HarmoniFuse's evaluation normalises (lower case, no punctuation,
numbers in words, years as said); the game's text is in `raw_text`. Dropped while extracting
(counts in `amazon-queen/amazon_queen.stats.json`, `drascula/drascula.stats.json`): parts of
lines without text or without audio, laughter, barks or hesitation alone ("Nyah har har haar!",
"Hmmm..."), lines in no language (grunts, made-up words), text of
implausible length for its audio (outside 2-30 characters per second), clips under 0.3 s.

**Drascula's noisy pairs**: its subtitles are not always what is said; {filter_text}. Noisy
pairs are left out of train (`drascula/drascula.jsonl` keeps all of them). Since Drascula never
enters dev or test, this filter does not bias the benchmark toward Whisper.
"""
