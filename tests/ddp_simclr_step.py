"""One SimCLR step on a fixed global batch of 8 images, in one process or as 2 DDP (gloo) processes.

    python tests/ddp_simclr_step.py {single|ddp} OUT.json
Lightning's DDP launcher re-runs this script for rank 1; rank 0 writes the loss and the weights.
Used by tests/test_ddp.py.
"""

import json
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

from remedis.config import RuntimeConfig
from remedis.models.backbones import create_backbone
from remedis.pretrain.simclr import SimCLRModule
from remedis.training import make_trainer, quiet_lightning

mode, out = sys.argv[1], sys.argv[2]
quiet_lightning()
torch.set_num_threads(1)
torch.manual_seed(0)
# GroupNorm backbone + linear projection: no BatchNorm, whose statistics would differ per process on CPU
# LARS (a linear function of the gradient): Adam's first step would turn float noise on zero gradients
# (timm zero-initialises each block's last norm) into full +-lr steps
class Recorded(SimCLRModule):
    def on_before_optimizer_step(self, optimizer):
        self.grads = torch.cat([p.grad.detach().flatten() for p in self.parameters()]).clone()


module = Recorded(create_backbone("resnetv2_18_bit", 1), projection_layers=1, lr=1.0, optimizer="lars")
before = torch.cat([p.detach().flatten() for p in module.parameters()]).clone()
g = torch.Generator().manual_seed(1)
views = torch.rand(2, 8, 1, 32, 32, generator=g)
devices = 2 if mode == "ddp" else 1
loader = DataLoader(TensorDataset(views[0], views[1]), batch_size=8 // devices, shuffle=False)
trainer = make_trainer(RuntimeConfig(precision="fp32", accelerator="cpu", devices=devices), epochs=1, progress=False)
trainer.fit(module, loader)
if trainer.global_rank == 0:
    weights = torch.cat([p.detach().flatten() for p in module.parameters()])
    json.dump({"loss": module.history[0]["nt_xent"], "world_size": trainer.world_size,
               "max_change": float((weights - before).abs().max()),
               "grads": module.grads[:: max(1, len(module.grads) // 4000)].tolist(),
               "weights": weights[:: max(1, len(weights) // 4000)].tolist()}, open(out, "w"))
