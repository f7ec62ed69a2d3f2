"""Character-level language model on text that ships with Python itself: the Python Language Reference
topics bundled as ``pydoc_data.topics`` (about 465k characters in CPython 3.11), nothing downloaded.

The corpus is the topics joined in sorted key order; characters outside printable ASCII become ``?``. It is
cut into non-overlapping windows of ``SEQUENCE + 1`` characters (input = the first SEQUENCE, target = the
last SEQUENCE); the last 10% of the text, after a gap of one window, is held out for validation, of which
``VALIDATION_WINDOWS`` evenly spaced windows are scored (to keep evaluation fast on a CPU).
An embedding → one-layer LSTM → linear next-character model (LEGW's home ground: LSTMs with warmup).
"""
from __future__ import annotations

import string
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from .base import Workload

SEQUENCE = 64
VALIDATION_FRACTION = 0.1
VALIDATION_WINDOWS = 256
VOCABULARY = sorted(set(string.printable) - set("\x0b\x0c\r")) + ["?"]


def python_topics_text() -> str:
    """The Python Language Reference topics shipped with this interpreter, as one printable-ASCII string."""
    from pydoc_data.topics import topics

    allowed = set(VOCABULARY)
    text = "\n".join(topics[key] for key in sorted(topics))
    return "".join(ch if ch in allowed else "?" for ch in text)


def encode(text: str) -> torch.Tensor:
    index = {ch: i for i, ch in enumerate(VOCABULARY)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def windows(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (input, next-character target) pairs of length SEQUENCE."""
    count = (len(codes) - 1) // (SEQUENCE + 1)
    chunks = codes[:count * (SEQUENCE + 1)].view(count, SEQUENCE + 1)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()


class CharLSTM(nn.Module):
    """Embedding(V, 32) → LSTM(32 → hidden) → Linear(hidden → V); outputs (batch, SEQUENCE, V) logits."""

    def __init__(self, vocabulary: int, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 32)
        self.lstm = nn.LSTM(32, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocabulary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(x))
        return self.out(hidden)


class CharLM(Workload):
    """Next-character prediction; loss is mean cross-entropy per character (nats), accuracy per character."""

    name = "charlm"
    micro_batch_size = 4
    base_lr = 0.5
    momentum = 0.9
    default_budget = 1200

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        codes = encode(python_topics_text())
        split = int(len(codes) * (1 - VALIDATION_FRACTION))
        self.train_x, self.train_y = windows(codes[:split])
        val_x, val_y = windows(codes[split + SEQUENCE + 1:])
        keep = torch.linspace(0, len(val_x) - 1, min(VALIDATION_WINDOWS, len(val_x))).long()
        self.val_x, self.val_y = val_x[keep], val_y[keep]

    def build_model(self) -> nn.Module:
        return CharLSTM(len(VOCABULARY))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.flatten(0, 1), target.flatten())

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        return (output.argmax(dim=-1) == target).sum()

    def predictions_per_sample(self, target: torch.Tensor) -> int:
        return target.shape[1]
