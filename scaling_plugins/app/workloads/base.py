"""What every built-in workload provides: data held in memory, a model factory, a deterministic sampler, an eval.

The sampler reads one global stream of training samples: epoch e is a permutation of the training set drawn
from ``(seed, e)``. An optimizer step at scale S = world × accumulation consumes the next S·B0 samples of the
stream from where the previous step stopped, where B0 = ``micro_batch_size``; micro-batch m of rank r takes the
(m·world + r)-th slice of B0 of them. So the S = 1 reference (one rank, no accumulation) and a run at any scale,
fixed or changing from step to step, read the same samples in the same order, just grouped into larger steps.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    """Validation numbers: mean loss, and accuracy in [0, 1] where the task has one (None otherwise)."""

    loss: float
    accuracy: Optional[float]


class Workload(ABC):
    """A training task with its data in memory. Subclasses set the data tensors and the defaults below.

    Attributes:
        name: registry name.
        micro_batch_size: B0, samples per micro-batch (the base batch of the S = 1 reference).
        base_lr: learning rate tuned for B0 with SGD and ``momentum``.
        momentum: SGD momentum.
        default_budget: training length in base-scale steps (samples seen by the reference / B0).
        train_x, train_y, val_x, val_y: the training and held-out validation tensors.
    """

    name: str
    micro_batch_size: int
    base_lr: float
    momentum: float
    default_budget: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    # -- what a subclass defines ----------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds torch's generator)."""

    @abstractmethod
    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch."""

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        """Number of correct predictions in a batch (a 0-d tensor); None where accuracy has no meaning."""
        return None

    def predictions_per_sample(self, target: torch.Tensor) -> int:
        """How many predictions one sample holds (1 for classification, the sequence length for a language model)."""
        return 1

    # -- shared ---------------------------------------------------------------------------------------------
    def make_model(self) -> nn.Module:
        """The model with weights drawn from ``seed``, identical on every rank and every call."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.build_model()

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:   # a step straddles at most two epochs
                self._permutations.clear()
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations[epoch] = torch.randperm(self.num_train, generator=generator)
        return self._permutations[epoch]

    def stream_indices(self, start: int, count: int) -> torch.Tensor:
        """Training-set indices of positions [start, start + count) of the global sample stream."""
        positions = torch.arange(start, start + count)
        epochs = positions // self.num_train
        out = torch.empty(count, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % self.num_train]
        return out

    def micro_batch_at(self, seen: int, rank: int, world: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch ``micro`` of ``rank`` in the optimizer step that starts after ``seen``
        samples of the stream (all ranks' samples of every earlier step)."""
        if not (0 <= rank < world and micro >= 0 and seen >= 0):
            raise ValueError(f"need 0 <= rank < world, micro >= 0 and seen >= 0, got rank={rank}, world={world}, "
                             f"micro={micro}, seen={seen}")
        start = seen + (micro * world + rank) * self.micro_batch_size
        index = self.stream_indices(start, self.micro_batch_size)
        return self.train_x[index], self.train_y[index]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 512) -> Evaluation:
        """Mean validation loss (and accuracy) of ``model`` over the held-out split; restores train mode."""
        was_training = model.training
        model.eval()
        total_loss, total_correct, total_predictions = 0.0, 0.0, 0
        has_accuracy = True
        for begin in range(0, len(self.val_x), batch_size):
            x, y = self.val_x[begin:begin + batch_size], self.val_y[begin:begin + batch_size]
            output = model(x)
            total_loss += self.loss(output, y).item() * len(x)
            correct = self.correct(output, y)
            has_accuracy = has_accuracy and correct is not None
            if correct is not None:
                total_correct += correct.item()
            total_predictions += len(x) * self.predictions_per_sample(y)
        model.train(was_training)
        accuracy = total_correct / total_predictions if has_accuracy else None
        return Evaluation(loss=total_loss / len(self.val_x), accuracy=accuracy)
