"""A batch that fails is answered item by item, so one bad file never costs the others their answer.

The CLI (``harmonifuse analyze``) and the service's inference worker both answer in batches; both
use :func:`answer_batch`, differing only in what a failed item becomes (a printed error, or the
error returned to that request's client) and in which errors are worth a retry.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence


def answer_batch(answer: Callable[[list], list], items: Sequence, failed: Callable[[Any, Exception], Any], *,
                 retry_on: tuple[type[Exception], ...] = (Exception,)) -> list:
    """``answer(items)``; when it raises one of ``retry_on``, each item alone, an item that raises
    again answered ``failed(item, error)`` (which may re-raise). A batch of one is not retried."""
    items = list(items)
    try:
        return answer(items)
    except retry_on as error:
        if len(items) == 1:
            return [failed(items[0], error)]
    results = []
    for item in items:
        try:
            results.append(answer([item])[0])
        except retry_on as error:
            results.append(failed(item, error))
    return results
