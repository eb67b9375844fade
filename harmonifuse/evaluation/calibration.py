"""Temperature scaling of the emotion probabilities (Guo et al., 2017), fitted on dev.

Label scoring gives each emotion the LLM's log-likelihood of answering it; a softmax over those
is far too sure of itself (it ranks well but its top probability is near 1 whether right or
wrong). One temperature T, the minimiser of the negative log-likelihood of the dev labels under
softmax(scores / T), fixes the scale without changing any prediction. It is stored in the model's
config (``model.calibration.ser_temperature``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from harmonifuse.data.manifest import Utterance
from harmonifuse.evaluation.evaluate import map_batches
from harmonifuse.evaluation.metrics import expected_calibration_error


def label_scores(model, utterances: Sequence[Utterance], *, batch_size: int = 8, cache=None,
                 progress: bool = True) -> torch.Tensor:
    """(N, K) every emotion label's answer log-likelihood per utterance (the model's label order)."""
    labels = model.config.tasks.emotion_labels
    prompt = model.config.tasks.prompts["ser"]

    def score(hidden, lengths):
        B = hidden.shape[1]
        speech = model.speech_embeddings(hidden, lengths, ["ser"] * B, [prompt] * B)
        return list(model.llm.score_labels(speech.embeddings, speech.lengths, [prompt] * B, labels).float().cpu())

    return torch.stack(map_batches(model, utterances, score, batch_size=batch_size, cache=cache, progress=progress,
                                   desc="label scores"))


def fit_temperature(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """scores (N, K), targets (N,) class indices -> the temperature minimising the NLL (log-parametrised)."""
    log_t = torch.zeros((), requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    scores = scores.float().detach()

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores / log_t.exp(), targets)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def calibration_report(scores: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, float]:
    """NLL and ECE (10 bins) of softmax(scores / temperature)."""
    probs = (scores.float() / temperature).softmax(-1)
    confidence, predicted = probs.max(-1)
    return {"nll": float(torch.nn.functional.cross_entropy(scores.float() / temperature, targets)),
            "ece": expected_calibration_error(confidence.numpy(), (predicted == targets).numpy()),
            "mean_confidence": float(confidence.mean()),
            "accuracy": float((predicted == targets).float().mean())}


def calibrate(model, utterances: Sequence[Utterance], *, batch_size: int = 8, cache=None,
              progress: bool = True) -> dict:
    """Fit the SER temperature on ``utterances`` (dev, with emotion labels) and set it on the model.

    Returns the temperature and the NLL / ECE before and after on these utterances."""
    labels = model.config.tasks.emotion_labels
    unknown = sorted({u.emotion for u in utterances} - set(labels))
    if not utterances or unknown:
        raise ValueError(f"calibration needs utterances labelled with {labels}"
                         + (f"; found unknown labels {unknown}" if unknown else "; got none"))
    scores = label_scores(model, utterances, batch_size=batch_size, cache=cache, progress=progress)
    targets = torch.tensor([labels.index(u.emotion) for u in utterances])
    temperature = fit_temperature(scores, targets)
    model.config.calibration.ser_temperature = round(temperature, 4)
    return {"ser_temperature": model.config.calibration.ser_temperature, "n": len(utterances),
            "before": calibration_report(scores, targets, 1.0),
            "after": calibration_report(scores, targets, model.config.calibration.ser_temperature)}
