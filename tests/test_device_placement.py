"""Every tensor a driver hands to a collective lives on the device of the optimizer's parameters: an NCCL process
group takes only its GPU's tensors (``driver.step(loss.item())`` once built a CPU tensor and all-reduced it). With no
GPU here, the parameters live on the ``meta`` device and a fake engine refuses any collective tensor elsewhere."""
from __future__ import annotations

import pytest
import torch

from scaling_plugins.backends.shared.driver import PolicyDriver


class MetaOnlyDriver(PolicyDriver):
    """A driver whose collectives, like NCCL's, accept only tensors on the parameters' device."""

    def __init__(self, optimizer: torch.optim.Optimizer, policy) -> None:
        super().__init__(optimizer, policy, world_size=2)
        self.seen: list[str] = []

    def _check(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.device.type != "meta":
            raise RuntimeError(f"{what}: a tensor on {tensor.device}, not on the process group's device")
        self.seen.append(what)

    def all_gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        self._check(row, "all_gather_rows")
        return torch.zeros(2, row.numel(), dtype=row.dtype)       # both ranks agree

    def all_reduce_mean(self, value: torch.Tensor) -> float:
        self._check(value, "all_reduce_mean")
        return 0.5


@pytest.mark.parametrize("loss", [0.5, torch.tensor(0.5)], ids=["loss.item()", "a CPU loss tensor"])
def test_every_collective_tensor_is_on_the_parameters_device(loss):
    param = torch.nn.Parameter(torch.empty(3, device="meta"))
    driver = MetaOnlyDriver(torch.optim.SGD([param], lr=0.1), {"type": "AutoWU", "params": {"total_num_steps": 10}})
    assert driver.device == torch.device("meta")
    driver.agree_across_ranks()
    assert driver.reduced_loss(loss) == 0.5
    assert driver.seen == ["all_gather_rows", "all_reduce_mean"]
