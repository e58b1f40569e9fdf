"""main_linear.py and eval_knn.py: real runs on a checkpoint of a tiny pretraining run."""

import glob
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import run_script
from test_pretrain_e2e import TINY

from config import ConfigError, get_config
from eval_knn import knn_correct
from main_linear import build_classifier, count_correct, load_pretrained_encoder, validate

SMALL = ["--batch-size", "4", "--amp-opt-level", "O0", "--opts", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
         "PRINT_FREQ", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    """(output root, checkpoint path) of a one-epoch MoBY pretraining run."""
    out = str(tmp_path_factory.mktemp("pretrain"))
    result = run_script(["main_pretrain.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *TINY, "TRAIN.EPOCHS", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = glob.glob(os.path.join(out, "*", "t", "checkpoint.pth"))
    return out, ckpt


def small_config(**opts):
    config = get_config()
    config.defrost()
    config.merge_from_list(["MODEL.ENCODER", "vit_tiny", "DATA.IMG_SIZE", 32])
    for key, value in opts.items():
        config.merge_from_list([key.replace("__", "."), value])
    config.freeze()
    return config


def encoder_state(ckpt_path):
    state = torch.load(ckpt_path, weights_only=False)["model"]
    return {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}


def test_loaded_encoder_equals_checkpoint(pretrained):
    model = build_classifier(small_config(), num_classes=3, freeze=True)
    load_pretrained_encoder(model, pretrained[1], "vit_tiny")
    state = model.state_dict()
    for key, value in encoder_state(pretrained[1]).items():
        assert torch.equal(state[key], value), key
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_bad_checkpoints_are_clear_errors(pretrained, tmp_path):
    model = build_classifier(small_config(), num_classes=3, freeze=True)
    missing = str(tmp_path / "none.pth")
    with pytest.raises(ConfigError, match="none.pth"):
        load_pretrained_encoder(model, missing, "vit_tiny")
    with pytest.raises(ConfigError, match="vit_tiny encoder, but MODEL.ENCODER is vit_small"):
        load_pretrained_encoder(model, pretrained[1], "vit_small")
    no_encoder = tmp_path / "heads.pth"
    torch.save({"model": {"projector.linear_out.weight": torch.zeros(1)}}, no_encoder)
    with pytest.raises(ConfigError, match="no encoder"):
        load_pretrained_encoder(model, str(no_encoder), "vit_tiny")
    other = build_classifier(small_config(MODEL__ENCODER="vit_small"), num_classes=3, freeze=True)
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in other.state_dict().items()}}, foreign)
    with pytest.raises(ConfigError, match="mismatched shapes"):
        load_pretrained_encoder(model, str(foreign), "vit_tiny")


@pytest.mark.parametrize("weights, port", [("freeze", 29631), ("finetune", 29632)])
def test_linear_eval_two_processes(pretrained, image_folder, weights, port):
    out, ckpt = pretrained
    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                         "main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *SMALL, "TRAIN.EPOCHS", "2",
                         "LINEAR_EVAL.WEIGHTS", weights])  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kind = "linprob" if weights == "freeze" else "ft"
    folder = os.path.join(os.path.dirname(ckpt), f"linear_imagenet_{kind}")
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert "EPOCH 1 imagenet val (16 images): top-1" in log and "best top-1" in log
    trained = torch.load(os.path.join(folder, "checkpoint.pth"), weights_only=False)
    assert trained["epoch"] == 1 and 0 <= trained["max_accuracy"] <= 100
    backbone = encoder_state(ckpt)
    changed = [k for k, v in backbone.items() if not torch.equal(trained["model"][k], v)]
    if weights == "freeze":
        assert changed == []
    else:
        assert "blocks.0.attn.qkv.weight" in changed and "pos_embed" not in changed

    # --eval reloads the trained classifier and reports the same accuracy
    result = run_script(["main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", "--eval", *SMALL, "LINEAR_EVAL.WEIGHTS", weights])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"top-1 {trained['accuracy']['top1']:.2f}%" in open(os.path.join(folder, "log_rank0.txt")).read()


def test_knn_eval_runs(pretrained, image_folder):
    out, ckpt = pretrained
    result = run_script(["eval_knn.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *SMALL])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = open(os.path.join(os.path.dirname(ckpt), "knn_imagenet", "log_rank0.txt")).read()
    for k in (10, 20, 100, 200):
        assert f"{k}-NN (T=0.07): top-1" in log


def test_missing_pretrained_checkpoint_is_one_line(image_folder, tmp_path):
    result = run_script(["main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", str(tmp_path), *SMALL])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no pretrained checkpoint at" in result.stderr and "checkpoint.pth" in result.stderr


# -----------------------------------------------------------------------------
# Exact accuracy over uneven shards, and k-NN on a known case
# -----------------------------------------------------------------------------


def test_count_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert count_correct(logits, torch.tensor([1, 1, 0]), topk=(1, 2)) == [1, 2]


def _validate_worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # rank 0: 3 samples, 2 right; rank 1: 2 samples, 0 right -> 2 / 5 = 40%, not (66.7 + 0) / 2
    logits = [torch.eye(6)[[0, 1, 2]], torch.eye(6)[[3, 4]]][rank]
    targets = [torch.tensor([0, 1, 5]), torch.tensor([0, 0])][rank]
    loader = [(logits[i : i + 2], targets[i : i + 2]) for i in range(0, len(targets), 2)]  # uneven batches
    acc1, acc5, _ = validate(
        torch.nn.Identity(), loader, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False)
    )
    torch.save((acc1, acc5), os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_validation_counts_exactly_over_uneven_shards(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_validate_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        acc1, acc5 = torch.load(tmp_path / f"{rank}.pt")
        assert acc1 == pytest.approx(40.0) and acc5 == pytest.approx(100.0)


def test_knn_weighted_votes():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [1.0, 0.05]]), dim=1)
    labels = torch.tensor([0, 1, 1, 1, 0])
    test = F.normalize(torch.tensor([[1.0, 0.01], [0.05, 1.0]]), dim=1)
    # k=5: three class-1 neighbours outvote two class-0 ones by count, but not by weight
    c1, c5 = knn_correct(train, labels, test, torch.tensor([0, 1]), k=5, num_classes=2)
    assert (c1, c5) == (2, 2)
    c1, _ = knn_correct(train, labels, test, torch.tensor([1, 0]), k=1, num_classes=2)
    assert c1 == 0
