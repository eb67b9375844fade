"""The tasks a HarmoniFuse model answers, registered once and read everywhere.

Each task names the manifest field that holds its label, how it is answered (a decoded
transcript, or one label out of a fixed set scored by the LLM) and its default prompt. Config
validation, manifests, the model's answers, evaluation and the built-in corpus all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

EMOTION_LABELS: tuple[str, ...] = ("neutral", "happy", "sad", "angry")
"""The emotion classes of the default SER task (IEMOCAP's four-class setup)."""


@dataclass(frozen=True)
class Task:
    name: str
    label_field: str
    """The manifest field that carries this task's label (``Utterance.text``, ``Utterance.emotion``)."""
    answer: Literal["transcript", "label"]
    """A transcript decoded token by token, or one label out of ``model.tasks.emotion_labels``."""
    default_prompt: str
    description: str


TASKS: dict[str, Task] = {
    "asr": Task("asr", "text", "transcript", "Transcribe the audio.", "speech recognition"),
    "ser": Task("ser", "emotion", "label", "What emotion does the speaker express? Answer with one word.",
                "speech emotion recognition"),
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> Task:
    """The registered task ``name``; ValueError naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {list(TASKS)}") from None


def tasks_answered_by(answer: str) -> list[str]:
    """The names of the tasks answered as ``answer`` ("transcript" or "label")."""
    return [t.name for t in TASKS.values() if t.answer == answer]
