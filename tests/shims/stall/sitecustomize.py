"""Test shim (on PYTHONPATH): the process of rank STALL_RANK hangs for STALL_SECONDS in its
STALL_AT-th gradient clipping, as a process stuck on a dead file system would."""

import os

if os.environ.get("RANK") == os.environ.get("STALL_RANK"):
    import time

    import torch

    _clip = torch.nn.utils.clip_grad_norm_
    _calls = 0

    def _stalling_clip(*args, **kwargs):
        global _calls
        _calls += 1
        if _calls == int(os.environ["STALL_AT"]):
            time.sleep(float(os.environ["STALL_SECONDS"]))
        return _clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = _stalling_clip
