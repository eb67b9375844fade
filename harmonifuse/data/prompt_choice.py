"""Which phrasing of its task prompt each training item reads.

A model trained on one prompt per task learns to tell the tasks apart by that exact wording:
prompt-conditioned fusion then maps an unseen paraphrase to weights between the tasks'. Drawing each
item's prompt from several phrasings (``model.tasks.train_prompts``) teaches it the task instead.

The draw depends only on (seed, stage, step, utterance id): a resumed run repeats it exactly, and
under DDP an item gets the same phrasing whichever rank holds it.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

from harmonifuse.data.batch import SpeechBatch

__all__ = ["PromptChoice"]


class PromptChoice:
    """Draws per-item training prompts: ``prompts[task]`` or one of ``extra[task]``, uniformly."""

    def __init__(self, prompts: Mapping[str, str], extra: Mapping[str, Sequence[str]], seed: int = 0) -> None:
        unknown = set(extra) - set(prompts)
        if unknown:
            raise ValueError(f"phrasings given for unknown task(s) {sorted(unknown)}; tasks are {sorted(prompts)}")
        # the canonical prompt first, then the others in order, without repeats
        self.phrasings = {task: list(dict.fromkeys([prompt, *extra.get(task, [])])) for task, prompt in prompts.items()}
        self.seed = seed

    @property
    def varies(self) -> bool:
        return any(len(options) > 1 for options in self.phrasings.values())

    def choose(self, tasks: Sequence[str], ids: Sequence[str], *, stage: str, step: int) -> list[str]:
        """One prompt per item, length B."""
        chosen = []
        for task, utt_id in zip(tasks, ids):
            options = self.phrasings[task]
            key = f"{self.seed}|{stage}|{step}|{task}|{utt_id}".encode()
            chosen.append(options[zlib.crc32(key) % len(options)])
        return chosen

    def __call__(self, batch: SpeechBatch, *, stage: str, step: int) -> SpeechBatch:
        """``batch`` with its items' training prompts set (unchanged when every task has one phrasing,
        so the model falls back to ``model.tasks.prompts``)."""
        if not self.varies:
            return batch
        return dataclasses.replace(batch, prompts=self.choose(batch.tasks, batch.ids, stage=stage, step=step))
