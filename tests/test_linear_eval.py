"""main_linear.py and eval_knn.py: real runs on a checkpoint of a tiny pretraining run."""

import glob
import json
import logging
import math
import os
import re
import shutil

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from conftest import ROOT, TINY, free_port, run_script

import eval_knn
import main_linear
from cli import run_cli
from config import ConfigError, get_config
from engine import classification_loss, train_classifier_one_epoch, validate
from knn import knn_correct
from lr_scheduler import build_scheduler
from main_linear import LINEAR_RECIPE, build_classifier, freeze_backbone, parse_option, set_training_mode
from metrics import count_correct
from optimizer import build_optimizer
from precision import OptimizerStep, amp_autocast
from pretrained import load_pretrained_encoder
from utils import scale_learning_rates

# no --amp-opt-level: the runs below use the default, fp32. The pretraining run's queue is in its
# name, hence its folder; its image size (32) comes from the checkpoint
SMALL = ["--batch-size", "4", "--opts", "DATA.NUM_WORKERS", "0", "MODEL.CONTRAST_NUM_NEGATIVE", "16", "PRINT_FREQ", "1"]
INHERITED = "DATA.IMG_SIZE: 224 -> 32 (the checkpoint's settings replace those of --cfg and the defaults)"


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    """(output root, checkpoint path) of a one-epoch MoBY pretraining run."""
    out = str(tmp_path_factory.mktemp("pretrain"))
    result = run_script(["main_pretrain.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *TINY, "TRAIN.EPOCHS", "1"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = glob.glob(os.path.join(out, "*", "t", "checkpoint.pth"))
    yield out, ckpt
    shutil.rmtree(out, ignore_errors=True)


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


@pytest.mark.slow
def test_loaded_encoder_equals_checkpoint(pretrained):
    model = build_classifier(small_config(), num_classes=3, freeze=True)
    load_pretrained_encoder(model, pretrained[1], "vit_tiny")
    state = model.state_dict()
    for key, value in encoder_state(pretrained[1]).items():
        assert torch.equal(state[key], value), key
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.timeout(600)  # three script runs, the first through torchrun
@pytest.mark.parametrize("weights", ["freeze", "finetune"])
def test_linear_eval_two_processes(pretrained, image_folder, weights):
    out, ckpt = pretrained
    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                         "main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *SMALL, "TRAIN.EPOCHS", "2",
                         "LINEAR_EVAL.WEIGHTS", weights])  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kind = "linprob" if weights == "freeze" else "ft"
    folder = os.path.join(os.path.dirname(ckpt), f"linear_imagenet_{kind}")
    log = open(os.path.join(folder, "log_rank0.txt")).read()
    assert "EPOCH 1 imagenet val (16 images): top-1" in log and "best top-1" in log
    for rank in (0, 1):  # every rank took the checkpoint's image size; rank 0 warns of the recipe's warm-up
        log = open(os.path.join(folder, f"log_rank{rank}.txt")).read()
        assert f"from the config of {ckpt}: {INHERITED}" in log
        assert log.count("WARNING TRAIN.WARMUP_EPOCHS 5 >= TRAIN.EPOCHS 2: the learning rate never leaves") == (
            rank == 0
        )
    # the original's recipe at 4 images x 2 processes: the rates per 512 images times 8 / 512
    config = json.load(open(os.path.join(folder, "config.json")))
    train = config["TRAIN"]
    assert config["DATA"]["BATCH_SIZE"] == 4 and config["AMP_OPT_LEVEL"] == "O0" and config["DATA"]["IMG_SIZE"] == 32
    assert train["BASE_LR"] == pytest.approx(1.0 * 8 / 512) and train["WARMUP_LR"] == pytest.approx(5e-7 * 8 / 512)
    assert train["MIN_LR"] == pytest.approx(5e-6 * 8 / 512)
    assert (train["EPOCHS"], train["WARMUP_EPOCHS"], train["WEIGHT_DECAY"], train["CLIP_GRAD"]) == (2, 5, 0.0, 5.0)
    assert (train["OPTIMIZER"]["NAME"], train["OPTIMIZER"]["MOMENTUM"], train["LR_SCHEDULER"]["NAME"]) == (
        "sgd", 0.9, "cosine")  # fmt: skip
    assert (config["MODEL"]["LABEL_SMOOTHING"], config["MODEL"]["DROP_PATH_RATE"]) == (0.1, 0.2)
    assert config["LINEAR_EVAL"]["BACKBONE_TRAIN_MODE"] is True and config["AUG"]["SSL_LINEAR_AUG"] is True
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

    # the training command again: the run is complete, nothing is retrained or rewritten
    before = open(os.path.join(folder, "checkpoint.pth"), "rb").read()
    result = run_script(["main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *SMALL, "TRAIN.EPOCHS", "2", "LINEAR_EVAL.WEIGHTS",
                         weights])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run complete: all 2 epochs already trained, checkpoint {folder}" in result.stdout
    assert f"(best top-1 {trained['max_accuracy']:.2f}%); nothing to do" in result.stdout
    assert "Train: [" not in result.stdout
    assert open(os.path.join(folder, "checkpoint.pth"), "rb").read() == before


@pytest.mark.slow
def test_knn_eval_runs(pretrained, image_folder):
    out, ckpt = pretrained
    result = run_script(["eval_knn.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", out, "--tag", "t", *SMALL])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = open(os.path.join(os.path.dirname(ckpt), "knn_imagenet", "log_rank0.txt")).read()
    assert f"from the config of {ckpt}: {INHERITED}" in log
    for k in (10, 20, 100, 200):
        assert f"{k}-NN (T=0.07): top-1" in log


@pytest.mark.slow
def test_missing_pretrained_checkpoint_is_one_line(image_folder, tmp_path):
    result = run_script(["main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
                         "--output", str(tmp_path), *SMALL])  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no pretrained checkpoint at" in result.stderr and "checkpoint.pth" in result.stderr
    assert os.listdir(tmp_path) == []  # no run folder, no linear_imagenet_linprob/ left behind


# -----------------------------------------------------------------------------
# Evaluation takes the encoder's settings from the checkpoint
# -----------------------------------------------------------------------------


def knn_argv(image_folder, output, pretrained_path, *opts, cfg="configs/moby_vit_tiny.yaml"):
    return ["--cfg", cfg, "--data-path", image_folder, "--output", str(output), "--batch-size", "4", "--opts",
            "DATA.NUM_WORKERS", "0", "LINEAR_EVAL.PRETRAINED", str(pretrained_path), *opts]  # fmt: skip


def knn_error(argv, capsys):
    """The one line eval_knn.py (run in this process) stops with."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(eval_knn.setup, eval_knn.main, argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith("error: ")
    return line


def knn_run(argv):
    """(config, log) of a complete eval_knn.py run in this process."""
    config, env, logger, held = eval_knn.setup(argv)
    eval_knn.main(config, env, logger, held)
    return config, open(os.path.join(config.OUTPUT, "knn_imagenet", "log_rank0.txt")).read()


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts, given, stored",
    [(["DATA.IMG_SIZE", "64"], "DATA.IMG_SIZE 64", "DATA.IMG_SIZE 32"),
     (["MODEL.ENCODER", "vit_small"], "MODEL.ENCODER vit_small", "MODEL.ENCODER vit_tiny")],
)  # fmt: skip
def test_opts_contradicting_the_checkpoint_are_one_line(pretrained, image_folder, tmp_path, capsys, opts, given,
                                                        stored):  # fmt: skip
    line = knn_error(knn_argv(image_folder, tmp_path, pretrained[1], *opts), capsys)
    assert f"--opts {given} contradicts {pretrained[1]}, pretrained with {stored}" in line


@pytest.mark.slow
def test_cfg_values_give_way_to_the_checkpoint(pretrained, image_folder, tmp_path):
    cfg = tmp_path / "at64.yaml"
    cfg.write_text(f"BASE: ['{os.path.abspath('configs/moby_vit_tiny.yaml')}']\nDATA:\n  IMG_SIZE: 64\n")
    config, log = knn_run(knn_argv(image_folder, tmp_path, pretrained[1], cfg=str(cfg)))
    assert config.DATA.IMG_SIZE == 32 and "DATA.IMG_SIZE: 64 -> 32" in log and "20-NN (T=0.07): top-1" in log
    # the same value given explicitly agrees with the checkpoint
    config, log = knn_run(knn_argv(image_folder, tmp_path / "same", pretrained[1], "DATA.IMG_SIZE", "32"))
    assert f"encoder settings as in the config of {pretrained[1]}: MODEL.ENCODER vit_tiny, DATA.IMG_SIZE 32" in log


@pytest.mark.slow
def test_checkpoints_without_a_stored_config(pretrained, image_folder, tmp_path, capsys):
    ckpt = torch.load(pretrained[1], map_location="cpu", weights_only=False)
    stored = yaml.safe_load(ckpt["config"])
    # the original code's checkpoints: the config as a CfgNode, read back as nested dicts
    original = tmp_path / "original.pth"
    torch.save({"model": ckpt["model"], "epoch": 0, "config": stored}, original)
    config, log = knn_run(knn_argv(image_folder, tmp_path / "original", original))
    assert config.DATA.IMG_SIZE == 32 and f"from the config of {original}: {INHERITED}" in log
    # a plain state dict carries nothing: the config is used as given, as before
    plain = tmp_path / "plain.pth"
    torch.save({"model": ckpt["model"]}, plain)
    config, log = knn_run(knn_argv(image_folder, tmp_path / "plain", plain, "DATA.IMG_SIZE", "32"))
    assert f"{plain} stores no config: the encoder is built from --cfg and --opts (MODEL.ENCODER vit_tiny, " in log
    assert "mismatched shapes ['pos_embed']" in knn_error(knn_argv(image_folder, tmp_path / "p224", plain), capsys)


def test_knn_defaults_are_dinos():
    config = get_config(eval_knn.parse_option(["--cfg", "configs/moby_vit_tiny.yaml"]))
    assert list(config.KNN.NB_KNN) == [10, 20, 100, 200] and config.KNN.TEMPERATURE == 0.07


@pytest.mark.slow
def test_knn_flags_and_saved_features(pretrained, image_folder, tmp_path):
    """--nb-knn and --temperature choose the votes; --load-features scores what --dump-features
    saved to the same figures, without the encoder's checkpoint or the images."""
    features = tmp_path / "features.pth"
    argv = [*knn_argv(image_folder, tmp_path / "dumped", pretrained[1]), "--nb-knn", "1", "3", "--temperature", "0.5"]
    config, log = knn_run([*argv, "--dump-features", str(features)])
    assert list(config.KNN.NB_KNN) == [1, 3] and "3-NN (T=0.5): top-1" in log and "20-NN" not in log
    computed = re.findall(r"(\d+-NN \(T=0.5\): top-1 \S+ top-5 \S+)", log)
    saved = torch.load(features, weights_only=True)
    assert saved["train_feats"].shape == (16, 192) and saved["num_classes"] == 2
    loaded_argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--output", str(tmp_path / "loaded"), "--nb-knn", "1", "3",
                   "--temperature", "0.5", "--load-features", str(features), "--opts", "LINEAR_EVAL.PRETRAINED",
                   str(tmp_path / "absent.pth")]  # fmt: skip
    _, log = knn_run(loaded_argv)
    assert re.findall(r"(\d+-NN \(T=0.5\): top-1 \S+ top-5 \S+)", log) == computed and len(computed) == 2


@pytest.mark.slow
def test_evaluation_finds_the_only_run_with_its_tag(pretrained, image_folder, tmp_path, capsys):
    """Pretrained with --opts MODEL.CONTRAST_NUM_NEGATIVE 16, evaluated without it: the folder the --cfg
    file's queue names does not exist, and the one moby / vit_tiny run with tag 't' is evaluated, its
    results in its folder. With a second such run the error names both, and nothing is written."""
    out = tmp_path / "out"
    shutil.copytree(pretrained[0], out)
    run = os.path.join(out, os.path.relpath(os.path.dirname(pretrained[1]), pretrained[0]))
    argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder, "--output", str(out), "--tag", "t",
            "--batch-size", "4", "--opts", "DATA.NUM_WORKERS", "0"]  # fmt: skip
    config, log = knn_run(argv)
    assert config.OUTPUT == run and "20-NN (T=0.07): top-1" in log
    assert (
        f"the only moby / vit_tiny run with tag 't' under the output folder is {run} "
        "(pretrained with --opts MODEL.CONTRAST_NUM_NEGATIVE 16): evaluating it" in log
    )
    names = os.listdir(out)
    assert names == [os.path.basename(os.path.dirname(run))]  # no folder for the queue of the --cfg file

    second = os.path.join(out, "moby__vit_tiny__odpr02_tdpr0_cm099_ct02_queue32_proj2_pred2", "t")
    shutil.copytree(run, second)
    line = knn_error(argv, capsys)
    expected = os.path.join(out, "moby__vit_tiny__odpr02_tdpr0_cm099_ct02_queue4096_proj2_pred2", "t")
    assert f"no pretrained checkpoint at {expected}" in line
    assert f"runs with tag 't': {run} (pretrained with --opts MODEL.CONTRAST_NUM_NEGATIVE 16), {second}" in line
    assert sorted(os.listdir(out)) == sorted([*names, os.path.basename(os.path.dirname(second))])


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


@pytest.mark.slow
def test_validation_counts_exactly_over_uneven_shards(tmp_path):
    mp.spawn(_validate_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        acc1, acc5 = torch.load(tmp_path / f"{rank}.pt")
        assert acc1 == pytest.approx(40.0) and acc5 == pytest.approx(100.0)


def test_knn_weighted_votes():
    train = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [1.0, 0.05]]), dim=1)
    labels = torch.tensor([0, 1, 1, 1, 0])
    test = F.normalize(torch.tensor([[1.0, 0.01], [0.05, 1.0]]), dim=1)
    # k=5: three class-1 neighbours outvote two class-0 ones by count, but not by weight
    c1, c5 = knn_correct(train, labels, test, torch.tensor([0, 1]), k=5, num_classes=2, temperature=0.07)
    assert (c1, c5) == (2, 2)
    c1, _ = knn_correct(train, labels, test, torch.tensor([1, 0]), k=1, num_classes=2, temperature=0.07)
    assert c1 == 0


# -----------------------------------------------------------------------------
# The recipe: resolved learning rates, the probe's modes, the loss
# -----------------------------------------------------------------------------


def linear_config(*argv):
    """main_linear.py's config for these command-line arguments (the recipe under them), before scaling."""
    return get_config(parse_option(["--cfg", "configs/moby_vit_tiny.yaml", *argv]), recipe=LINEAR_RECIPE)


def test_recipe_resolves_to_the_originals_rates():
    config = linear_config()
    assert config.DATA.BATCH_SIZE == 64
    scale_learning_rates(config, world_size=4)  # the original's launch: 4 GPUs x 64 = 256 images a step
    assert config.TRAIN.BASE_LR == pytest.approx(0.5)
    assert config.TRAIN.WARMUP_LR == pytest.approx(2.5e-7) and config.TRAIN.MIN_LR == pytest.approx(2.5e-6)
    assert (config.MODEL.LABEL_SMOOTHING, config.MODEL.DROP_PATH_RATE) == (0.1, 0.2)
    assert config.TRAIN.EPOCHS == 100 and config.TRAIN.WARMUP_EPOCHS == 5  # over the YAML's 300 and 5
    # a config's own drop path wins: the ResNet ones set 0, as the original ran its ResNets
    resnet = get_config(parse_option(["--cfg", "configs/byol_resnet50.yaml"]), recipe=LINEAR_RECIPE)
    assert resnet.MODEL.DROP_PATH_RATE == 0.0 and resnet.TRAIN.WARMUP_EPOCHS == 5  # the YAML says 10
    # flags over --opts over the recipe
    config = linear_config("--batch-size", "32", "--lr", "0.4", "--drop-path-rate", "0.1",
                           "--opts", "TRAIN.MIN_LR", "0.0", "TRAIN.BASE_LR", "3.0")  # fmt: skip
    scale_learning_rates(config, world_size=2)
    assert config.TRAIN.BASE_LR == pytest.approx(0.4 * 64 / 512) and config.TRAIN.MIN_LR == 0.0
    assert config.TRAIN.WARMUP_LR == pytest.approx(5e-7 * 64 / 512) and config.MODEL.DROP_PATH_RATE == 0.1


def probe_one_epoch(model, config, batches, freeze=True):
    """Run main_linear's training loop over ``batches`` (one epoch); returns the features that
    reached the head at each step. [B, num_features] each."""
    features = []
    hook = model.get_classifier().register_forward_pre_hook(lambda _, inputs: features.append(inputs[0].clone()))
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, len(batches))
    params = [p for p in model.parameters() if p.requires_grad]
    step = OptimizerStep(optimizer, params, torch.amp.GradScaler("cpu", enabled=False), config.TRAIN.CLIP_GRAD)
    set_training_mode(model, freeze, config.LINEAR_EVAL.BACKBONE_TRAIN_MODE)
    train_classifier_one_epoch(config, model, batches, step, scheduler, amp_autocast(config, torch.device("cpu")), 0,
                               logging.getLogger("probe"))  # fmt: skip
    hook.remove()
    return features


def probe_config(**opts):
    """The recipe for a tiny probe: ViT-Tiny at 32 px, learning rate without warm-up."""
    return small_config(TRAIN__BASE_LR=0.5, TRAIN__WARMUP_EPOCHS=0, TRAIN__OPTIMIZER__NAME="sgd", **opts)


def same_batch_twice(seed=0):
    generator = torch.Generator().manual_seed(seed)
    images, targets = torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 0])
    return [(images, targets), (images, targets)]


@pytest.mark.parametrize("train_mode", [True, False])
def test_probe_backbone_drop_path_follows_its_mode(train_mode):
    torch.manual_seed(0)
    config = probe_config(LINEAR_EVAL__BACKBONE_TRAIN_MODE=train_mode)
    model = build_classifier(config, num_classes=3, freeze=True)
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    head = model.get_classifier().weight.clone()
    first, second = probe_one_epoch(model, config, same_batch_twice())
    # train mode: drop path makes the frozen features of one batch differ between passes
    assert torch.equal(first, second) == (not train_mode)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in backbone.items())
    assert not torch.equal(model.get_classifier().weight, head)


def test_probe_keeps_batchnorm_statistics_of_a_frozen_backbone():
    config = probe_config()
    assert config.LINEAR_EVAL.BACKBONE_TRAIN_MODE
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)  # BatchNorm in every block
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))  # statistics of "pretraining", away from their init
    freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_one_epoch(model, config, same_batch_twice())
    after = model.state_dict()
    assert [k for k in before if not torch.equal(after[k], before[k])] == ["fc.weight", "fc.bias"]
    # fine-tuning trains the BatchNorms, statistics included
    probe_one_epoch(model, config, same_batch_twice(), freeze=False)
    assert not torch.equal(model.state_dict()["bn1.running_mean"], before["bn1.running_mean"])


def test_label_smoothed_loss_closed_form():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 2])
    # per sample: (1 - s) (logsumexp - z_y) + s (logsumexp - mean z), s = 0.1
    first = math.log(math.exp(2) + 2) - 0.9 * 2 - 0.1 * 2 / 3
    second = math.log(math.exp(1) + 2) - 0.1 * 1 / 3
    assert classification_loss(logits, targets, 0.1).item() == pytest.approx((first + second) / 2, rel=1e-6)
    assert classification_loss(logits, targets, 0.0).item() == pytest.approx(
        (math.log(math.exp(2) + 2) - 2 + math.log(math.exp(1) + 2)) / 2, rel=1e-6
    )
    uniform = torch.zeros(3, 5)  # -log(1/5) whatever the smoothing
    assert classification_loss(uniform, torch.tensor([0, 3, 4]), 0.3).item() == pytest.approx(math.log(5), rel=1e-6)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_and_the_restart_resumes(pretrained, image_folder, tmp_path):
    args = ["main_linear.py", "--cfg", "configs/moby_vit_tiny.yaml", "--data-path", image_folder,
            "--output", str(tmp_path), "--tag", "t", *SMALL, "TRAIN.EPOCHS", "2",
            "LINEAR_EVAL.PRETRAINED", pretrained[1]]  # fmt: skip
    # the disk fills up while epoch 1's checkpoint is written (the run's second)
    shim = {"PYTHONPATH": os.path.join(ROOT, "tests", "shims", "full_disk"), "FULL_DISK_AT": "2"}
    full = run_script(args, env=shim)
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    (folder,) = glob.glob(os.path.join(tmp_path, "*", "t", "linear_imagenet_linprob"))
    latest = os.path.join(folder, "checkpoint.pth")
    assert [x for x in full.stderr.splitlines() if x.startswith("error: ")] == [
        f"error: could not write {latest} (No space left on device); the last good checkpoint is {latest}: "
        f"free space in {folder} (or fix it), then resume"
    ]
    assert not glob.glob(os.path.join(folder, "*.tmp.*"))
    assert torch.load(latest, weights_only=False)["epoch"] == 0  # epoch 0's, intact

    resumed = run_script(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {latest} (epoch 0," in open(os.path.join(folder, "log_rank0.txt")).read()
    assert torch.load(latest, weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("script", [main_linear, eval_knn])
def test_a_wrong_data_path_stops_before_any_folder(script, tmp_path, capsys):
    argv = ["--cfg", "configs/moby_vit_tiny.yaml", "--data-path", str(tmp_path / "nowhere"), "--output",
            str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_cli(script.setup, script.main, argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and line.startswith(f"error: {tmp_path / 'nowhere' / 'train'} not found")
    assert not (tmp_path / "out").exists()
