"""Run under torchrun by test_trainer_dist.py: train, then record each rank's parameter checksum."""
import json
import sys

import torch
import torch.distributed as dist

from qovaryx_model.trainer import shutdown_distributed, train

recipe, data, out = sys.argv[1:4]
res = train(recipe, data, out=out, progress=False)
with torch.no_grad():  # FSDP: each rank's own shard; DDP: the whole model
    flat = torch.cat([getattr(p, "to_local", lambda: p)().detach().float().reshape(-1) for p in res.model.parameters()])
    mine = torch.stack([flat.sum(), flat.square().sum(), flat[::97].sum()]).double()
gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, mine)
if dist.get_rank() == 0:
    with open(f"{out}/ranks.json", "w") as f:
        json.dump([g.tolist() for g in gathered], f)
del res, flat, mine, gathered  # an FSDP model holds the process group
shutdown_distributed()
