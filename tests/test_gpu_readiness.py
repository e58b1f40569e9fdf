"""What the CUDA path depends on, checked on the CPU: the device of each process, TF32, the grad
scaler across precisions, the gradient-norm meter under fp16, host-device synchronisations in the
loops, and --throughput measuring SynCo's own steps."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import small_config

import main_pretrain
from config import ConfigError, get_config
from distributed import pick_device
from engine import train_classifier_one_epoch
from lr_scheduler import build_scheduler
from metrics import DeviceMeters
from models import synco
from optimizer import build_optimizer
from precision import GradScaler, OptimizerStep, amp_autocast, precision_line, set_tf32

# -----------------------------------------------------------------------------
# The device of each process
# -----------------------------------------------------------------------------


def fake_cuda(count):
    return SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count)


def test_each_process_takes_its_local_gpu():
    assert pick_device(3, fake_cuda(8)) == torch.device("cuda", 3)
    assert pick_device(0, fake_cuda(0)) == torch.device("cpu")


def test_one_gpu_per_task_is_that_tasks_gpu():
    """SLURM --gpus-per-task=1: local ranks 1..n see one GPU each, as cuda:0."""
    assert [pick_device(rank, fake_cuda(1)) for rank in range(4)] == [torch.device("cuda", 0)] * 4


def test_fewer_gpus_than_local_processes_is_one_line():
    with pytest.raises(ConfigError, match="local rank 3 but this process sees 2 GPUs"):
        pick_device(3, fake_cuda(2))


# -----------------------------------------------------------------------------
# TF32
# -----------------------------------------------------------------------------


def test_tf32_is_on_by_default_and_follows_the_setting_on_cuda():
    assert get_config().TRAIN.TF32 is True
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for on in (True, False):
            config = small_config("moby", TRAIN__TF32=on)
            set_tf32(config, torch.device("cuda", 0))
            assert torch.backends.cuda.matmul.allow_tf32 is on and torch.backends.cudnn.allow_tf32 is on
        set_tf32(small_config("moby", TRAIN__TF32=True), torch.device("cpu"))  # no CUDA: untouched
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_the_precision_line_says_whether_matmuls_use_tf32():
    cuda = torch.device("cuda", 0)
    assert "O0 (fp32, fp32 matmuls on TF32 tensor cores) on cuda:0" in precision_line(small_config("moby"), cuda)
    assert "full-fp32 matmuls (TRAIN.TF32 False)" in precision_line(small_config("moby", TRAIN__TF32=False), cuda)
    assert precision_line(small_config("moby"), torch.device("cpu")) == "precision: AMP_OPT_LEVEL O0 (fp32) on cpu"


# -----------------------------------------------------------------------------
# The grad scaler and the optimisation step
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("saved_enabled, enabled", [(False, True), (True, False), (True, True)])
def test_a_resume_may_change_the_precision(saved_enabled, enabled):
    """O0 / O2 checkpoints hold a disabled scaler's empty state; an O1 resume starts its scaler afresh."""
    saved = GradScaler("cpu", enabled=saved_enabled, init_scale=1024.0)
    scaler = GradScaler("cpu", enabled=enabled)
    scaler.load_state_dict(saved.state_dict())
    expected = 1024.0 if saved_enabled and enabled else 65536.0
    assert scaler.is_enabled() == enabled and (not enabled or scaler.get_scale() == expected)
    with pytest.raises(RuntimeError, match="state dict is empty"):  # what PyTorch's own does
        torch.amp.GradScaler("cpu").load_state_dict(torch.amp.GradScaler("cpu", enabled=False).state_dict())


def test_the_gradient_norm_mean_skips_the_steps_fp16_overflows():
    meters = DeviceMeters()
    for value in (2.0, math.inf, 4.0, math.nan):
        meters.update(grad_norm=torch.tensor(value))
    last, mean = meters.read()["grad_norm"]
    assert math.isnan(last) and mean == 3.0
    restored = DeviceMeters()
    restored.load_state_dict(meters.state_dict(), torch.device("cpu"))
    restored.update(grad_norm=torch.tensor(9.0))
    assert restored.read()["grad_norm"] == (9.0, 5.0)
    meters.load_state_dict({"last": {"loss": torch.tensor(1.0)}, "sum": {"loss": torch.tensor(6.0)},
                            "count": {"loss": 3}}, torch.device("cpu"))  # fmt: skip  # an earlier version's
    assert meters.read()["loss"] == (1.0, 2.0)


def linear_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    images, targets = torch.randn(8, 6), torch.randint(0, 3, (8,))
    return model, images, targets


def test_accumulated_half_batches_update_as_one_batch():
    loss_fn = torch.nn.functional.cross_entropy
    model, images, targets = linear_and_batches()
    reference, _, _ = linear_and_batches()
    disabled = GradScaler("cpu", enabled=False)
    step = OptimizerStep(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), disabled, accumulation=2)
    assert step(loss_fn(model(images[:4]), targets[:4]), update=False) is None
    norm = step(loss_fn(model(images[4:]), targets[4:]), update=True)
    one = OptimizerStep(torch.optim.SGD(reference.parameters(), lr=0.1), reference.parameters(), disabled)
    one_norm = one(loss_fn(reference(images), targets))
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(norm, one_norm)
    assert all(p.grad is None for p in model.parameters())


def test_without_clipping_the_gradients_are_measured_not_rescaled():
    model, images, targets = linear_and_batches()
    torch.nn.functional.cross_entropy(model(images), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    seen = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer.step = lambda: seen.extend(p.grad.clone() for p in model.parameters())
    norm = OptimizerStep(optimizer, model.parameters(), GradScaler("cpu", enabled=False)).update()
    torch.testing.assert_close(norm, expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, grads))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(images), targets).backward()
    clipped = OptimizerStep(optimizer, model.parameters(), GradScaler("cpu", enabled=False), clip_grad=1e-3)
    seen.clear()
    torch.testing.assert_close(clipped.update(), expected)
    assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in seen])) == pytest.approx(1e-3, rel=1e-4)


# -----------------------------------------------------------------------------
# Host-device synchronisations of the classifier loop
# -----------------------------------------------------------------------------


def count_reads(monkeypatch):
    """Count the Tensor methods that make the host wait for the device."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def classifier_epoch_reads(steps, monkeypatch):
    config = small_config("moby", PRINT_FREQ=1000, TRAIN__WARMUP_EPOCHS=0, TRAIN__OPTIMIZER__NAME="sgd")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, steps)
    step = OptimizerStep(optimizer, model.parameters(), GradScaler("cpu", enabled=False), config.TRAIN.CLIP_GRAD)
    batches = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 3])) for _ in range(steps)]
    counts = count_reads(monkeypatch)
    autocast = amp_autocast(config, torch.device("cpu"))
    train_classifier_one_epoch(config, model, batches, step, scheduler, autocast, 0, logging.getLogger("reads"))
    monkeypatch.undo()
    return counts["n"]


def test_the_classifier_loop_reads_the_device_only_where_it_logs(monkeypatch):
    """The same number of reads for 4 and 12 steps: none per step, only at the logged first and last."""
    assert classifier_epoch_reads(4, monkeypatch) == classifier_epoch_reads(12, monkeypatch) > 0


# -----------------------------------------------------------------------------
# --throughput
# -----------------------------------------------------------------------------


def test_throughput_of_synco_runs_its_synthetic_negatives(tmp_path, monkeypatch, capsys):
    """SynCo's window starts after a warm-up; the throughput's steps (all in epoch 0) are SynCo's all the same."""
    calls = []
    original = synco.synthetic_logits
    monkeypatch.setattr(synco, "synthetic_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    argv = ["--cfg", "configs/synco_vit_tiny.yaml", "--throughput", "--output", str(tmp_path), "--batch-size", "4",
            "--opts", "DATA.IMG_SIZE", "32", "MODEL.CONTRAST_NUM_NEGATIVE", "16", "MODEL.N_HARD", "8",
            "MODEL.PROJ_HIDDEN_DIM", "64"]  # fmt: skip
    config, env, logger = main_pretrain.setup(argv)
    assert config.MODEL.SYNTHETIC_START_EPOCH > 0
    main_pretrain.main(config, env, logger)
    assert len(calls) == 2 * 13  # both directions of the symmetric loss, 3 warm-up and 10 timed steps
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("throughput: ")
