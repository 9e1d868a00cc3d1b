"""Helpers shared by the continual tests (and their review)."""

from __future__ import annotations

from splice.continual import harness


def stop_at(monkeypatch, index: int) -> None:
    """Ctrl-C as task `index` starts (outside any task's training)."""
    train = harness._Run.train

    def stopping(self, task):
        if task.index == index:
            raise KeyboardInterrupt
        return train(self, task)

    monkeypatch.setattr(harness._Run, "train", stopping)
