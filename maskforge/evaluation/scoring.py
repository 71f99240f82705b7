"""Accuracy: stream a split through one or more models in one pass and count what each gets right.

Every model sees the same normalized batches, so their predictions can be compared example by example
(argmax agreement against a float32 reference). Counts per model: the confusion matrix (true class x
predicted class, which gives top-1 and per-class accuracy), top-k hits with k = min(5, classes), each
example's predicted class, and the largest logit difference from the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..data import InputSpec, iterate_batches, normalize
from ..errors import MaskforgeError
from .report import Accuracy, Agreement, ClassResult

TOP_K = 5
Runner = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[str, int, int], None]


@dataclass
class Scores:
    """Running counts of one model over a split."""

    k: int
    confusion: np.ndarray  # int64 [classes, classes]: [true, predicted]
    correct_topk: int = 0
    predictions: list[np.ndarray] = field(default_factory=list)  # argmax per batch
    max_abs_diff: float = 0.0  # vs the reference model's logits

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    def predicted(self) -> np.ndarray:
        return np.concatenate(self.predictions) if self.predictions else np.zeros(0, dtype=np.int64)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first; ties go to the lower class index (as argmax)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def score(
    runners: dict[str, Runner],
    dataset,
    spec: InputSpec,
    batch_size: int,
    *,
    reference: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Scores]:
    """One pass over `dataset` (uint8 images, in order) through every runner; `reference` names the runner
    whose logits the others are compared with."""
    classes = spec.num_classes
    k = min(TOP_K, classes)
    scores = {name: Scores(k, np.zeros((classes, classes), dtype=np.int64)) for name in runners}
    order = sorted(runners, key=lambda name: name != reference)  # the reference first
    total, done = len(dataset), 0
    for images, labels in iterate_batches(dataset, batch_size, shuffle=False):
        done += len(labels)
        readable = labels >= 0  # -1: an image the data set could not decode (ImageFileDataset.skip_bad)
        if not bool(readable.all()):
            images, labels = images[readable], labels[readable]
            if len(labels) == 0:
                continue
        x = normalize(images, spec).numpy()
        y = labels.numpy()
        reference_logits = None
        for name in order:
            logits = runners[name](x)
            if logits.ndim != 2 or logits.shape != (len(y), classes):
                raise MaskforgeError(
                    f"the model's output has shape {list(logits.shape)}, expected "
                    f"[{len(y)}, {classes}] (batch, classes)"
                )
            _update(scores[name], logits, y, classes)
            if name == reference:
                reference_logits = logits
            elif reference_logits is not None:
                diff = float(np.abs(logits.astype(np.float64) - reference_logits).max())
                scores[name].max_abs_diff = max(scores[name].max_abs_diff, diff)
        if progress is not None:
            progress("scoring", done, total)
    return scores


def _update(scores: Scores, logits: np.ndarray, y: np.ndarray, classes: int) -> None:
    top = top_k(logits, scores.k)
    predicted = top[:, 0]
    scores.confusion += np.bincount(y * classes + predicted, minlength=classes * classes).reshape(classes, classes)
    scores.correct_topk += int((top == y[:, None]).any(axis=1).sum())
    scores.predictions.append(predicted)


def accuracy_section(
    scores: Scores,
    spec: InputSpec,
    data: str,
    split: str,
    search_heldout_acc: float | None = None,
    unreadable: list[dict] | None = None,
) -> Accuracy:
    examples = scores.examples
    return Accuracy(
        data=data,
        split=split,
        examples=examples,
        correct=scores.correct,
        top1=scores.correct / examples,
        k=scores.k,
        correct_topk=scores.correct_topk,
        topk=scores.correct_topk / examples,
        per_class=per_class(scores.confusion, spec.class_names),
        confusion=scores.confusion.tolist(),
        search_heldout_acc=search_heldout_acc,
        unreadable=list(unreadable or []),
    )


def per_class(confusion: np.ndarray, names) -> list[ClassResult]:
    """Accuracy of each true class (a row of the confusion matrix) and the class it is most mistaken for."""
    out = []
    for index, name in enumerate(names):
        row = confusion[index]
        examples, correct = int(row.sum()), int(row[index])
        wrong = row.copy()
        wrong[index] = 0
        confused = names[int(wrong.argmax())] if wrong.any() else None
        out.append(ClassResult(name, examples, correct, correct / examples if examples else None, confused))
    return out


def agreement_section(scores: Scores, reference: Scores, description: str) -> Agreement:
    """How the model's predictions compare with the reference's on the same examples."""
    examples = scores.examples
    agree = int((scores.predicted() == reference.predicted()).sum())
    return Agreement(
        reference=description,
        reference_correct=reference.correct,
        reference_top1=reference.correct / examples,
        top1_difference=(scores.correct - reference.correct) / examples,
        argmax_agreement=agree / examples,
        max_abs_diff=scores.max_abs_diff,
    )
