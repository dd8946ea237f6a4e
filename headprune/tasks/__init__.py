"""Tasks: what a model is trained and judged on. Each gives the recipes its data, model, loss and
metric (see base.Task); the training loop, gates, methods, physical pruning and reports are the
same for all."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Task, resolve_model

TASK_NAMES = ("classification", "translation", "causal-lm", "image-classification")


def get_task(name: str) -> Task:
    if name == "classification":
        from .classification import Classification
        return Classification()
    if name == "translation":
        from .translation import Translation
        return Translation()
    if name == "causal-lm":
        from .language_modeling import LanguageModeling
        return LanguageModeling()
    if name == "image-classification":
        from .image_classification import ImageClassification
        return ImageClassification()
    raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")


__all__ = ["TASK_NAMES", "Task", "get_task", "resolve_model"]
