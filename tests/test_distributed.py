"""Two real gloo processes: ranks stay identical and the queues hold every rank's keys in rank order."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port, small_config, views

from models import build_model

pytestmark = pytest.mark.slow  # two real processes (mp.spawn) in a gloo process group


def _worker(rank, world_size, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)  # same initial weights; DDP broadcasts rank 0's anyway
    model = build_model(small_config("synco", MODEL__SYNTHETIC_START_EPOCH=0), steps_per_epoch=10)
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        x1, x2 = views(batch=4, seed=100 * rank + step)  # different data on each rank
        torch.manual_seed(1000 * rank + step)  # different synthetic-negative draws too
        ddp(x1, x2)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    # a known batch of keys per rank goes through the real gather
    ptr = int(model.queue_ptr)
    keys = F.normalize(torch.arange(4 * 16, dtype=torch.float32).view(4, 16) + 100 * rank, dim=1)
    model.enqueue(keys, -keys)
    torch.save({"state": model.state_dict(), "ptr": ptr}, os.path.join(result_dir, f"rank{rank}.pth"))
    dist.destroy_process_group()


def test_ranks_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth", weights_only=False) for r in range(2))
    for key, value in r0["state"].items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BatchNorm statistics are per process on the CPU (SyncBatchNorm on CUDA)
        assert torch.equal(value, r1["state"][key]), key
    assert int(r0["state"]["step"]) == 3
    # 3 steps of 2 x 4 keys into a queue of 16, then the known keys of rank 0 and rank 1
    ptr = r0["ptr"]
    assert ptr == (3 * 8) % 16 and int(r0["state"]["queue_ptr"]) == (ptr + 8) % 16
    for rank in range(2):
        keys = F.normalize(torch.arange(4 * 16, dtype=torch.float32).view(4, 16) + 100 * rank, dim=1)
        torch.testing.assert_close(r0["state"]["queue1"][:, ptr + 4 * rank : ptr + 4 * rank + 4], keys.T)
        torch.testing.assert_close(r0["state"]["queue2"][:, ptr + 4 * rank : ptr + 4 * rank + 4], -keys.T)
