"""One process, no launcher (Horovod's size-1 path: no gradient hooks, everything reduced in synchronize()):
bias-free Linear(4, 2), 2 backward passes on one-hot inputs e_0, e_1 → gain = scale = 2. Prints JSON."""
import json

import horovod.torch as hvd
import torch

import scaling_plugins.backends.horovod as sph

hvd.init()
model = torch.nn.Linear(4, 2, bias=False)
opt = sph.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                               backward_passes_per_step=2)
for k in range(2):
    (model(torch.eye(4)[k].reshape(1, 4)).sum() / 2).backward()
opt.step()
print(json.dumps({"size": hvd.size(), "gain": opt.gain, "scale": opt.scale}))
