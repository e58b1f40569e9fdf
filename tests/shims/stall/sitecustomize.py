"""Test shim (on PYTHONPATH): the process of rank STALL_RANK hangs for STALL_SECONDS in its
STALL_AT-th gradient clipping, as a process stuck on a dead file system would.

Under torchrun, with STALL_ATTEMPT set, it hangs only in that attempt (TORCHELASTIC_RESTART_COUNT),
and in the other attempts starts STALL_LATE_START seconds late (default 0), after the others
have joined the group."""

import os

if os.environ.get("RANK") == os.environ.get("STALL_RANK"):
    import time

    import torch

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("STALL_ATTEMPT", attempt) == attempt:
        _clip = torch.nn.utils.clip_grad_norm_
        _calls = 0

        def _stalling_clip(*args, **kwargs):
            global _calls
            _calls += 1
            if _calls == int(os.environ["STALL_AT"]):
                time.sleep(float(os.environ["STALL_SECONDS"]))
            return _clip(*args, **kwargs)

        torch.nn.utils.clip_grad_norm_ = _stalling_clip
    else:
        time.sleep(float(os.environ.get("STALL_LATE_START", 0)))
