"""The configuration tree: every key, its default and its meaning.

YAML files under ``configs/`` hold only overrides and may inherit from other
files with ``BASE: ['other.yaml']``. ``get_config(args)`` clones the defaults,
merges the YAML file, then the command-line flags, then ``--opts``, and freezes.
``RANGES`` holds the values each key may hold; ``check_config`` checks them and the rules
across keys once at start-up.
"""

import difflib
import math
import os
import re

import yaml
from yacs.config import CfgNode as CN

_C = CN()

# Base config files, merged before this file (paths relative to it)
_C.BASE = [""]

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per process (GPU); the global batch is this times the world size
_C.DATA.BATCH_SIZE = 128
# ImageNet-style root holding train/<class>/* and val/<class>/*
_C.DATA.DATA_PATH = ""
# Dataset name: imagenet or imagenet100 (DATA_PATH), or a transfer set such as cifar10 or cifar100
# (DATA.TRANSFER_ROOT), for pretraining and for linear evaluation alike
_C.DATA.DATASET = "imagenet"
# Where transfer datasets are read from and downloaded to
_C.DATA.TRANSFER_ROOT = "./data"
# Input image size (square)
_C.DATA.IMG_SIZE = 224
# Interpolation of the evaluation resizes with timm's supervised recipe (AUG.SSL_LINEAR_AUG False):
# bicubic, bilinear or nearest
_C.DATA.INTERPOLATION = "bicubic"
# Read train.zip + train_map.txt instead of folders
_C.DATA.ZIP_MODE = False
# Zip mode cache: "no" reads on demand, "full" caches every image, "part" this rank's shard
_C.DATA.CACHE_MODE = "part"
# Pin CPU memory in the DataLoader for faster host-to-device copies
_C.DATA.PIN_MEMORY = True
# DataLoader workers per process; -1: its CPU cores minus one (at most 16); more than its cores is capped
_C.DATA.NUM_WORKERS = -1
# Pretraining: flip, colour jitter, grayscale, blur and solarize batched on the device, not in the workers
_C.DATA.GPU_AUG = False

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Self-supervised framework: moby, byol or synco
_C.MODEL.TYPE = "moby"
# Backbone: swin_tiny, swin_small, swin_base, vit_tiny, vit_small, vit_base, resnet18, resnet34, resnet50,
# resnet101, resnet152, resnet200
_C.MODEL.ENCODER = "swin_tiny"
# Run name (the folder OUTPUT/NAME/TAG); empty or a shipped config's follows the effective settings (run_name)
_C.MODEL.NAME = ""
# Checkpoint to resume from (set by --resume)
_C.MODEL.RESUME = ""
# Classes of the linear-evaluation head (main_linear.py takes it from the dataset)
_C.MODEL.NUM_CLASSES = 1000
# Drop path rate of the backbone in linear evaluation (active while the probe trains when
# LINEAR_EVAL.BACKBONE_TRAIN_MODE) and fine-tuning; set by --drop-path-rate
_C.MODEL.DROP_PATH_RATE = 0.2
# Label smoothing of the linear-evaluation / fine-tuning loss (0 is plain cross-entropy)
_C.MODEL.LABEL_SMOOTHING = 0.1
# Drop path rate of the online encoder
_C.MODEL.ONLINE_DROP_PATH_RATE = 0.1
# Drop path rate of the momentum (target) encoder
_C.MODEL.TARGET_DROP_PATH_RATE = 0.0
# Base momentum of the target update; follows a cosine schedule to 1 over training
_C.MODEL.CONTRAST_MOMENTUM = 0.99
# Temperature of the InfoNCE loss (moby, synco)
_C.MODEL.CONTRAST_TEMPERATURE = 0.2
# Size of each of the two key queues (moby, synco)
_C.MODEL.CONTRAST_NUM_NEGATIVE = 4096
# Output dimension of the projector and predictor
_C.MODEL.PROJ_DIM = 256
# Hidden dimension of the projector and predictor
_C.MODEL.PROJ_HIDDEN_DIM = 4096
# Layers of the projector MLP
_C.MODEL.PROJ_NUM_LAYERS = 2
# Layers of the predictor MLP
_C.MODEL.PRED_NUM_LAYERS = 2
# Freeze the ViT patch projection (MoCo v3 / BYOL-ViT trick); ignored by Swin
_C.MODEL.STOP_GRAD_CONV1 = False
# synco: queue entries most similar to each query that synthetic negatives are made from
_C.MODEL.N_HARD = 256
# synco: number of synthetic negatives of each kind per query (128, 128, 128, 64, 64, 64:
# what the original code ran, its constructor's defaults; it never read these keys)
_C.MODEL.N1 = 128  # interpolation a*q + (1-a)*n
_C.MODEL.N2 = 128  # extrapolation q + b*(n - q)
_C.MODEL.N3 = 128  # mixup g*n1 + (1-g)*n2
_C.MODEL.N4 = 64  # noise injection n + N(0, sigma^2)
_C.MODEL.N5 = 64  # perturbation n + delta * d(q.n)/dn
_C.MODEL.N6 = 64  # adversarial n + eta * sign(d(q.n)/dn)
# synco: upper bound of a in kind 1, a ~ U[0, INTERP_MAX)
_C.MODEL.INTERP_MAX = 0.5
# synco: upper bound of b in kind 2, b ~ U[1, EXTRAP_MAX)
_C.MODEL.EXTRAP_MAX = 1.5
# synco: standard deviation sigma of kind 4's noise
_C.MODEL.NOISE_STD = 0.1
# synco: step delta of kind 5
_C.MODEL.PERTURB_STEP = 0.01
# synco: step eta of kind 6
_C.MODEL.ADVERSARIAL_STEP = 0.01
# synco: synthetic negatives are used from this epoch ... (alias: MODEL.WARMUP_EPOCHS, the original's name)
_C.MODEL.SYNTHETIC_START_EPOCH = 30
# synco: ... to this epoch, both included (alias: MODEL.COOLDOWN_EPOCHS)
_C.MODEL.SYNTHETIC_END_EPOCH = 100

# ViT encoders
_C.MODEL.VIT = CN()
# Side of the square patches; DATA.IMG_SIZE must be a multiple of it (4 for 32 px CIFAR images: 8 x 8 tokens)
_C.MODEL.VIT.PATCH_SIZE = 16

# ResNet encoders
_C.MODEL.RESNET = CN()
# The CIFAR stem: a 3x3 stride-1 first convolution and no max-pool (for 32 px images)
_C.MODEL.RESNET.CIFAR_STEM = False

# -----------------------------------------------------------------------------
# Linear evaluation (main_linear.py)
# -----------------------------------------------------------------------------
_C.LINEAR_EVAL = CN()
# Pretrained checkpoint file, or a run folder; empty means the run folder OUTPUT/NAME/TAG
# (a folder: its newest readable checkpoint, as auto-resume picks it)
_C.LINEAR_EVAL.PRETRAINED = ""
# "freeze" trains the head on frozen features, "finetune" trains everything
_C.LINEAR_EVAL.WEIGHTS = "freeze"
# Probing: the frozen backbone in train mode, its drop path perturbing the features (the original's);
# False: eval mode (MoCo v3, DINO). A frozen backbone's BatchNorms stay in eval mode either way.
_C.LINEAR_EVAL.BACKBONE_TRAIN_MODE = True

# -----------------------------------------------------------------------------
# Weighted k-NN classification (eval_knn.py)
# -----------------------------------------------------------------------------
_C.KNN = CN()
# The numbers of neighbours k scored (set by --nb-knn)
_C.KNN.NB_KNN = [10, 20, 100, 200]
# Temperature T of each neighbour's vote exp(cosine / T) (set by --temperature)
_C.KNN.TEMPERATURE = 0.07
# Save the train and val features and labels to this file (set by --dump-features)
_C.KNN.DUMP_FEATURES = ""
# Read them from this file instead of computing them: no encoder, no images (set by --load-features)
_C.KNN.LOAD_FEATURES = ""

# -----------------------------------------------------------------------------
# Monitors of a pretraining run (main_pretrain.py): accuracy while it trains. They read the
# training set's labels (class folders, or a labelled DATA.DATASET) and DATA_PATH/val, and never
# change the pretraining: with them on or off a seed trains the same weights, bit for bit.
# -----------------------------------------------------------------------------
_C.MONITOR = CN()
# A linear classifier (BatchNorm without affine, then Linear) trained on the online encoder's
# detached features of both views, with its own SGD: running train top-1 in the step log, val
# top-1 (centre crop) after each epoch
_C.MONITOR.ONLINE_LINEAR = True
# Its learning rate (SGD, momentum 0.9, no weight decay, constant)
_C.MONITOR.LINEAR_LR = 0.1
# Weighted k-NN top-1 of the online encoder on the val images every KNN_EVERY epochs and after the
# last (0: never); the bank holds un-augmented (centre-cropped) training images
_C.MONITOR.KNN_EVERY = 10
# Training images per class in the k-NN bank, spread evenly over each class (0: all of them)
_C.MONITOR.KNN_TRAIN_PER_CLASS = 100
# The k-NN monitor's k and temperature (eval_knn.py's 20-NN, T = 0.07)
_C.MONITOR.KNN_K = 20
_C.MONITOR.KNN_TEMPERATURE = 0.07

# -----------------------------------------------------------------------------
# Image retrieval (eval_retrieval.py; DATA.DATASET roxford5k or rparis6k under DATA.TRANSFER_ROOT)
# -----------------------------------------------------------------------------
_C.RETRIEVAL = CN()
# Longest side of the images fed to the encoder: larger ones are shrunk to it, aspect kept
# (DINO's published runs: 224 on ROxford, 512 with MULTISCALE on RParis)
_C.RETRIEVAL.IMG_SIZE = 224
# Average the features of the images at scales 1, 1/sqrt(2) and 1/2 (then L2-normalised)
_C.RETRIEVAL.MULTISCALE = False
# Crop each query to its box, as the revisited protocol says (False: whole, as DINO's script feeds them)
_C.RETRIEVAL.CROP_QUERIES = True
# Save the features to this file (set by --dump-features)
_C.RETRIEVAL.DUMP_FEATURES = ""
# Read the features from this file instead of computing them (set by --load-features)
_C.RETRIEVAL.LOAD_FEATURES = ""

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
# First epoch (set from the checkpoint on resume)
_C.TRAIN.START_EPOCH = 0
# Number of epochs
_C.TRAIN.EPOCHS = 300
# Linear learning-rate warmup, in epochs
_C.TRAIN.WARMUP_EPOCHS = 20
# Weight decay (not applied to norms, biases and tokens)
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rate for a global batch of 512; scaled linearly with the batch
_C.TRAIN.BASE_LR = 5e-4
# Learning rate at the start of warmup (scaled like BASE_LR)
_C.TRAIN.WARMUP_LR = 5e-7
# Final learning rate of the schedule (scaled like BASE_LR)
_C.TRAIN.MIN_LR = 5e-6
# Clip the gradient norm to this value; 0 disables clipping
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest checkpoint in the output folder
_C.TRAIN.AUTO_RESUME = True
# Also save checkpoint.pth every SAVE_EVERY_STEPS steps inside epochs (0: only at their ends);
# a run resumed from it continues at the next step exactly
_C.TRAIN.SAVE_EVERY_STEPS = 0
# Gradient accumulation steps; 0 or 1 means none
_C.TRAIN.ACCUMULATION_STEPS = 0
# Gradient checkpointing in the backbones to save memory
_C.TRAIN.USE_CHECKPOINT = False
# torch.compile the online and target encoders (weights and checkpoints are unchanged)
_C.TRAIN.COMPILE = False
# On CUDA, fp32 matmuls and convolutions on TF32 tensor cores (every script; no effect on CPUs)
_C.TRAIN.TF32 = True

# Learning-rate schedule
_C.TRAIN.LR_SCHEDULER = CN()
# cosine, linear or step, each after the linear warmup, updated every step
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"
# step: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# step: multiplicative decay factor
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# adamw, sgd or lars
_C.TRAIN.OPTIMIZER.NAME = "adamw"
# adamw: epsilon
_C.TRAIN.OPTIMIZER.EPS = 1e-8
# adamw: betas
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# sgd and lars: momentum
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# lars: trust coefficient eta of the layer-wise rate eta * |w| / |g + wd * w|
_C.TRAIN.OPTIMIZER.TRUST_COEFFICIENT = 0.001

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Two-view self-supervised augmentation; pretraining requires it
_C.AUG.SSL_AUG = True
# byol (BYOL's asymmetric views) or simclr (the original's name for MoCo v2's symmetric views)
_C.AUG.SSL_AUG_TYPE = "byol"
# byol: lower bound of the random-resized-crop scale (simclr crops with (0.2, 1), as the original)
_C.AUG.SSL_AUG_CROP = 0.08
# Gaussian blur in the views as AUG.SSL_AUG_TYPE has it; False: never (the CIFAR recipes at 32 px)
_C.AUG.SSL_AUG_BLUR = True
# Resampling of the self-supervised recipes: the pretraining crops and, with SSL_LINEAR_AUG,
# the evaluation crops and resizes; bilinear (the original's), bicubic or nearest
_C.AUG.SSL_AUG_INTERPOLATION = "bilinear"
# Evaluation transforms: the original's (random-resized crop + flip; test resize to IMG_SIZE + 32
# and centre crop) (True), or timm's supervised recipe (test resize to IMG_SIZE / 0.875) (False)
_C.AUG.SSL_LINEAR_AUG = True

# -----------------------------------------------------------------------------
# Video object segmentation on DAVIS 2017 (eval_video_segmentation.py; DINO's protocol)
# -----------------------------------------------------------------------------
_C.DAVIS = CN()
# Video list DATA.TRANSFER_ROOT/DAVIS/ImageSets/2017/<SPLIT>.txt
_C.DAVIS.SPLIT = "val"
# Frames are resized to this short side, the long side to a multiple of 64 below its
# proportional length (480 px frames: 480 x 832)
_C.DAVIS.SHORT_SIDE = 480
# Context of each frame: the first frame and the N_LAST_FRAMES frames before it
_C.DAVIS.N_LAST_FRAMES = 7
# A patch takes labels only from patches at most this many rows and columns away (0: anywhere)
_C.DAVIS.NEIGHBORHOOD = 12
# ... from its TOPK most similar context patches
_C.DAVIS.TOPK = 5
# ... weighted by a softmax of their cosine similarities at this temperature
_C.DAVIS.TEMPERATURE = 0.1

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Test images: resize (see AUG.SSL_LINEAR_AUG) and centre-crop (True), or resize straight to IMG_SIZE
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision: "" or O0 fp32 (the original's default), O1 fp16 autocast with a grad scaler,
# O2 bf16 autocast (the fast choice on GPUs)
_C.AMP_OPT_LEVEL = "O0"
# Root of the output folders
_C.OUTPUT = "output"
# Run tag; the output folder is OUTPUT/MODEL.NAME/TAG
_C.TAG = "default"
# Save a numbered checkpoint every SAVE_FREQ epochs and at the last (checkpoint.pth is written every epoch)
_C.SAVE_FREQ = 100
# Log every PRINT_FREQ steps
_C.PRINT_FREQ = 10
# Write TensorBoard scalars into the output folder (rank 0; skipped with one log line without tensorboard)
_C.TENSORBOARD = True
# Unpickle checkpoints in full, even those holding objects beyond tensors and plain
# containers (set by --trust-checkpoint): that can run code, so only for files you trust
_C.TRUST_CHECKPOINT = False
# Seconds a process waits in a collective (or for the others to join) before it stops: under
# gloo with an error naming its rank and step, under NCCL aborted by PyTorch's watchdog
# (SIGABRT); a stalled or dead peer then ends the run instead of hanging it. Long enough for
# the slowest save and evaluation.
_C.DIST_TIMEOUT = 1800
# Random seed (offset by the rank)
_C.SEED = 0
# Only evaluate (main_linear.py)
_C.EVAL_MODE = False
# Only measure throughput
_C.THROUGHPUT_MODE = False
# Local rank of this process (from the launcher)
_C.LOCAL_RANK = 0
# Resume a run whose schedule, batch or model settings differ from its checkpoint's (set by --accept-changes)
_C.ACCEPT_CHANGES = False


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


AMP_LEVELS = ("", "O0", "O1", "O2")
SSL_AUG_TYPES = ("byol", "simclr")
RESAMPLINGS = ("bilinear", "bicubic", "nearest")


# -----------------------------------------------------------------------------
# The values every key may hold (RANGES), checked once at start-up
# -----------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds_text(kind, low, high, closed_left=True, closed_right=True):
    """'a number in [0, 1)', 'an integer >= 1', 'an integer': ``kind`` within the bounds (None: unbounded)."""
    if low is not None and high is not None:
        return f"{kind} in {'[' if closed_left else '('}{low}, {high}{']' if closed_right else ')'}"
    if low is not None:
        return f"{kind} {'>=' if closed_left else '>'} {low}"
    return kind


class Integer:
    """Integers from ``low`` to ``high``, both included (None: unbounded)."""

    def __init__(self, low=None, high=None):
        self.low, self.high = low, high
        self.text = _bounds_text("an integer", low, high)

    def __call__(self, value):
        return _is_int(value) and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)


class Interval:
    """Finite numbers from ``low`` (None: unbounded) to ``high`` (None: unbounded), each end included
    when closed."""

    def __init__(self, low=None, high=None, closed_left=True, closed_right=True):
        self.low, self.high, self.closed_left, self.closed_right = low, high, closed_left, closed_right
        self.text = _bounds_text("a number", low, high, closed_left, closed_right)

    def __call__(self, value):
        if not _is_number(value):
            return False
        above = self.low is None or (value >= self.low if self.closed_left else value > self.low)
        below = self.high is None or (value <= self.high if self.closed_right else value < self.high)
        return above and below


class OneOf:
    """The strings of ``choices``: a tuple, or a function returning them (registries whose modules
    import torch, read only when a config is checked); with ``ignore_case``, in any case."""

    def __init__(self, choices, ignore_case=False):
        self._choices, self.ignore_case = choices, ignore_case

    @property
    def choices(self):
        return tuple(self._choices() if callable(self._choices) else self._choices)

    @property
    def text(self):
        return "one of " + ", ".join(repr(c) if c == "" else c for c in self.choices)

    def __call__(self, value):
        if not isinstance(value, str):
            return False
        return (value.lower() if self.ignore_case else value) in self.choices


class Boolean:
    text = "True or False"

    def __call__(self, value):
        return isinstance(value, bool)


class Text:
    """Any string (a path, a name), or with ``non_empty`` any but ''."""

    def __init__(self, non_empty=False):
        self.non_empty = non_empty
        self.text = "a non-empty string" if non_empty else "a string"

    def __call__(self, value):
        return isinstance(value, str) and (value != "" or not self.non_empty)


class ListOf:
    """Lists (or tuples) of at least ``min_len`` items, each allowed by ``item``."""

    def __init__(self, item, min_len=0):
        self.item, self.min_len = item, min_len
        self.text = f"a {'non-empty ' if min_len else ''}list, each item {item.text}"

    def __call__(self, value):
        return isinstance(value, (list, tuple)) and len(value) >= self.min_len and all(map(self.item, value))


class TupleOf:
    """Tuples (or lists) of exactly ``length`` items, each allowed by ``item``."""

    def __init__(self, item, length):
        self.item, self.length = item, length
        self.text = f"a tuple of {length} items, each {item.text}"

    def __call__(self, value):
        return isinstance(value, (list, tuple)) and len(value) == self.length and all(map(self.item, value))


positive_int = Integer(1)
non_negative_int = Integer(0)
any_int = Integer()
positive = Interval(0, closed_left=False)
non_negative = Interval(0)
fraction = Interval(0, 1)  # probabilities
below_one = Interval(0, 1, closed_right=False)  # momenta, drop path rates
boolean = Boolean()
any_string = Text()


def _frameworks():
    from models.build import FRAMEWORKS

    return FRAMEWORKS


def _encoders():
    from models.build import ENCODERS

    return ENCODERS


def _datasets():
    from data.linear import DATASET_ALIASES, LINEAR_DATASETS
    from data.retrieval import RETRIEVAL_DATASETS

    return (*LINEAR_DATASETS, *DATASET_ALIASES, *RETRIEVAL_DATASETS)


# Every leaf key of _C -> the values it may hold (tests/test_config_ranges.py checks that each key
# has one and tries values outside each through the command line). The scripts add their own rules
# on top (e.g. eval_retrieval.py takes only the retrieval sets of DATA.DATASET).
RANGES = {
    "BASE": ListOf(any_string),
    "DATA.BATCH_SIZE": positive_int,
    "DATA.DATA_PATH": any_string,
    "DATA.DATASET": OneOf(_datasets, ignore_case=True),
    "DATA.TRANSFER_ROOT": any_string,
    "DATA.IMG_SIZE": Integer(16),  # one patch of the ViTs
    "DATA.INTERPOLATION": OneOf(RESAMPLINGS),
    "DATA.ZIP_MODE": boolean,
    "DATA.CACHE_MODE": OneOf(("no", "full", "part")),
    "DATA.PIN_MEMORY": boolean,
    "DATA.NUM_WORKERS": Integer(-1),
    "DATA.GPU_AUG": boolean,
    "MODEL.TYPE": OneOf(_frameworks),
    "MODEL.ENCODER": OneOf(_encoders),
    "MODEL.NAME": any_string,
    "MODEL.RESUME": any_string,
    "MODEL.NUM_CLASSES": positive_int,
    "MODEL.DROP_PATH_RATE": below_one,
    "MODEL.LABEL_SMOOTHING": below_one,
    "MODEL.ONLINE_DROP_PATH_RATE": below_one,
    "MODEL.TARGET_DROP_PATH_RATE": below_one,
    "MODEL.CONTRAST_MOMENTUM": below_one,
    "MODEL.CONTRAST_TEMPERATURE": positive,
    "MODEL.CONTRAST_NUM_NEGATIVE": positive_int,
    "MODEL.PROJ_DIM": positive_int,
    "MODEL.PROJ_HIDDEN_DIM": positive_int,
    "MODEL.PROJ_NUM_LAYERS": non_negative_int,  # 0: the identity
    "MODEL.PRED_NUM_LAYERS": non_negative_int,
    "MODEL.STOP_GRAD_CONV1": boolean,
    "MODEL.N_HARD": positive_int,  # and at most MODEL.CONTRAST_NUM_NEGATIVE (check_config)
    "MODEL.N1": non_negative_int,
    "MODEL.N2": non_negative_int,
    "MODEL.N3": non_negative_int,
    "MODEL.N4": non_negative_int,
    "MODEL.N5": non_negative_int,
    "MODEL.N6": non_negative_int,
    "MODEL.INTERP_MAX": fraction,
    "MODEL.EXTRAP_MAX": Interval(1),
    "MODEL.NOISE_STD": non_negative,
    "MODEL.PERTURB_STEP": non_negative,
    "MODEL.ADVERSARIAL_STEP": non_negative,
    "MODEL.SYNTHETIC_START_EPOCH": any_int,  # a window outside the run is a warning (inert_settings)
    "MODEL.SYNTHETIC_END_EPOCH": any_int,
    "MODEL.VIT.PATCH_SIZE": positive_int,  # and dividing DATA.IMG_SIZE (check_config)
    "MODEL.RESNET.CIFAR_STEM": boolean,
    "LINEAR_EVAL.PRETRAINED": any_string,
    "LINEAR_EVAL.WEIGHTS": OneOf(("freeze", "finetune")),
    "LINEAR_EVAL.BACKBONE_TRAIN_MODE": boolean,
    "KNN.NB_KNN": ListOf(positive_int, min_len=1),
    "KNN.TEMPERATURE": positive,
    "KNN.DUMP_FEATURES": any_string,
    "KNN.LOAD_FEATURES": any_string,
    "MONITOR.ONLINE_LINEAR": boolean,
    "MONITOR.LINEAR_LR": positive,
    "MONITOR.KNN_EVERY": non_negative_int,
    "MONITOR.KNN_TRAIN_PER_CLASS": non_negative_int,
    "MONITOR.KNN_K": positive_int,
    "MONITOR.KNN_TEMPERATURE": positive,
    "RETRIEVAL.IMG_SIZE": Integer(16),
    "RETRIEVAL.MULTISCALE": boolean,
    "RETRIEVAL.CROP_QUERIES": boolean,
    "RETRIEVAL.DUMP_FEATURES": any_string,
    "RETRIEVAL.LOAD_FEATURES": any_string,
    "TRAIN.START_EPOCH": non_negative_int,  # and below TRAIN.EPOCHS (check_config)
    "TRAIN.EPOCHS": positive_int,
    "TRAIN.WARMUP_EPOCHS": non_negative_int,
    "TRAIN.WEIGHT_DECAY": non_negative,
    "TRAIN.BASE_LR": non_negative,
    "TRAIN.WARMUP_LR": non_negative,
    "TRAIN.MIN_LR": non_negative,
    "TRAIN.CLIP_GRAD": non_negative,  # 0: no clipping
    "TRAIN.AUTO_RESUME": boolean,
    "TRAIN.SAVE_EVERY_STEPS": non_negative_int,  # 0: only at the ends of epochs
    "TRAIN.ACCUMULATION_STEPS": non_negative_int,  # 0 and 1: none
    "TRAIN.USE_CHECKPOINT": boolean,
    "TRAIN.COMPILE": boolean,
    "TRAIN.TF32": boolean,
    "TRAIN.LR_SCHEDULER.NAME": OneOf(("cosine", "linear", "step")),
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": positive_int,
    "TRAIN.LR_SCHEDULER.DECAY_RATE": Interval(0, 1, closed_left=False),
    "TRAIN.OPTIMIZER.NAME": OneOf(("adamw", "sgd", "lars")),
    "TRAIN.OPTIMIZER.EPS": positive,
    "TRAIN.OPTIMIZER.BETAS": TupleOf(below_one, 2),
    "TRAIN.OPTIMIZER.MOMENTUM": below_one,
    "TRAIN.OPTIMIZER.TRUST_COEFFICIENT": positive,
    "AUG.SSL_AUG": boolean,
    "AUG.SSL_AUG_TYPE": OneOf(SSL_AUG_TYPES),
    "AUG.SSL_AUG_CROP": Interval(0, 1, closed_left=False),
    "AUG.SSL_AUG_BLUR": boolean,
    "AUG.SSL_AUG_INTERPOLATION": OneOf(RESAMPLINGS),
    "AUG.SSL_LINEAR_AUG": boolean,
    "DAVIS.SPLIT": Text(non_empty=True),
    "DAVIS.SHORT_SIDE": Integer(16),
    "DAVIS.N_LAST_FRAMES": non_negative_int,
    "DAVIS.NEIGHBORHOOD": non_negative_int,  # 0: anywhere
    "DAVIS.TOPK": positive_int,
    "DAVIS.TEMPERATURE": positive,
    "TEST.CROP": boolean,
    "AMP_OPT_LEVEL": OneOf(AMP_LEVELS),  # "": O0
    "OUTPUT": any_string,
    "TAG": any_string,
    "SAVE_FREQ": positive_int,
    "PRINT_FREQ": positive_int,
    "TENSORBOARD": boolean,
    "TRUST_CHECKPOINT": boolean,
    "ACCEPT_CHANGES": boolean,
    "DIST_TIMEOUT": positive_int,
    "SEED": Integer(0, 2**32 - 1),
    "EVAL_MODE": boolean,
    "THROUGHPUT_MODE": boolean,
    "LOCAL_RANK": non_negative_int,
}


def leaf_keys(node=None, prefix=""):
    """The dotted names of the leaf keys of ``node`` (the defaults _C), in order."""
    node = _C if node is None else node
    for name, value in node.items():
        if isinstance(value, CN):
            yield from leaf_keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def config_value(config, key):
    for part in key.split("."):
        config = config[part]
    return config


def check_ranges(config):
    """ConfigError naming the first key whose value RANGES does not allow, the value and what it allows."""
    for key in leaf_keys(config):
        if key not in RANGES:
            raise LookupError(f"config key {key} has no entry in config.RANGES: add the values it may hold")
        value = config_value(config, key)
        if not RANGES[key](value):
            raise ConfigError(f"{key} {value!r}: must be {RANGES[key].text}")


# command-line flag -> config key it sets (when given)
_FLAG_KEYS = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "zip": "DATA.ZIP_MODE",
    "cache_mode": "DATA.CACHE_MODE",
    "resume": "MODEL.RESUME",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "use_checkpoint": "TRAIN.USE_CHECKPOINT",
    "amp_opt_level": "AMP_OPT_LEVEL",
    "output": "OUTPUT",
    "tag": "TAG",
    "eval": "EVAL_MODE",
    "throughput": "THROUGHPUT_MODE",
    "trust_checkpoint": "TRUST_CHECKPOINT",
    "accept_changes": "ACCEPT_CHANGES",
    "dump_features": "RETRIEVAL.DUMP_FEATURES",
    "load_features": "RETRIEVAL.LOAD_FEATURES",
    "nb_knn": "KNN.NB_KNN",
    "temperature": "KNN.TEMPERATURE",
    "knn_dump_features": "KNN.DUMP_FEATURES",
    "knn_load_features": "KNN.LOAD_FEATURES",
    "lr": "TRAIN.BASE_LR",
    "drop_path_rate": "MODEL.DROP_PATH_RATE",
}


# an earlier name of a key -> its name; accepted in YAML files and --opts (the original's configs use them)
KEY_ALIASES = {
    "MODEL.WARMUP_EPOCHS": "MODEL.SYNTHETIC_START_EPOCH",
    "MODEL.COOLDOWN_EPOCHS": "MODEL.SYNTHETIC_END_EPOCH",
}


def _read_yaml_mapping(cfg_file):
    """The mapping of keys the YAML file ``cfg_file`` holds; ConfigError naming the file when it is
    missing, unreadable, not YAML, empty or anything but a mapping."""
    if os.path.isdir(cfg_file):
        raise ConfigError(f"config file {cfg_file} is a directory, not a YAML file")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file) as f:
            yaml_cfg = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {cfg_file}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {cfg_file} is not a text file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"config file {cfg_file} is not valid YAML: {problem}{where}") from None
    if yaml_cfg is None:
        raise ConfigError(
            f"config file {cfg_file} is empty: it should hold a mapping of keys, e.g. 'MODEL: {{TYPE: moby}}'"
        )
    if not isinstance(yaml_cfg, dict):
        raise ConfigError(
            f"config file {cfg_file} holds a {type(yaml_cfg).__name__}, not a mapping of keys "
            "such as 'MODEL: {TYPE: moby}'"
        )
    _check_key_names(yaml_cfg, cfg_file)
    return yaml_cfg


def _check_key_names(tree, where, prefix=""):
    """ConfigError for a key of the nested mapping ``tree`` that is not a name (a number, a list)."""
    for name, value in tree.items():
        if not isinstance(name, str):
            raise ConfigError(f"config file {where}: the key {prefix}{name!r} is not a name such as {prefix}EPOCHS")
        if isinstance(value, dict):
            _check_key_names(value, where, f"{prefix}{name}.")


def _check_opts_keys(keys):
    """ConfigError for an --opts key that goes below a key that is not a group (DATA.BATCH_SIZE.X)."""
    for key in keys:
        node, parts = _C, key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.get(part) if isinstance(node, CN) else None
            if node is not None and not isinstance(node, CN):
                raise ConfigError(f"--opts: no key {key}: {'.'.join(parts[: i + 1])} is a key, not a group of keys")


def _update_config_from_file(config, cfg_file, including=()):
    """Merge ``cfg_file`` into ``config``, after its BASE files (``including``: the files whose BASE
    led here, so that a file that includes itself is an error, not an endless recursion)."""
    yaml_cfg = _read_yaml_mapping(cfg_file)
    bases = yaml_cfg.setdefault("BASE", [""])
    if not isinstance(bases, list) or not all(isinstance(base, str) for base in bases):
        raise ConfigError(f"{cfg_file}: BASE {bases!r} must be a list of file names, e.g. BASE: ['../moby.yaml']")
    including = (*including, os.path.realpath(cfg_file))
    config.defrost()
    for base in bases:
        if base:
            path = os.path.join(os.path.dirname(cfg_file), base)
            if os.path.realpath(path) in including:
                raise ConfigError(f"{cfg_file}: BASE {base} includes itself (through {' -> '.join(including)})")
            _update_config_from_file(config, path, including)
    for alias, key in KEY_ALIASES.items():
        _rename_in_tree(yaml_cfg, alias, key, cfg_file)
    try:
        config.merge_from_other_cfg(CN(yaml_cfg))
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _merge_error(cfg_file, e) from None
    config.freeze()


_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '[\w.]+'> vs\. <class '(?:\w+\.)*(\w+)'>\) "  # the type given, without its module
    r"with values \(.* vs\. (.*)\) for config key: (\S+)$",
    re.S,
)
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a float", "bool": "a boolean", "list": "a list",
               "tuple": "a tuple", "CfgNode": "a mapping", "NoneType": "None"}  # fmt: skip


def _merge_error(where, e):
    """The ConfigError of yacs's error ``e`` when merging ``where`` (a file, --opts): one line, and for
    a value of the wrong type the key, the value and what RANGES allows."""
    text = str(e.args[0]) if e.args else type(e).__name__
    mismatch = _TYPE_MISMATCH.match(text)
    if mismatch:
        given_type, given, key = mismatch.groups()
        if key in RANGES:
            hint = "; write it with a decimal point, e.g. 1.0" if given_type == "int" and isinstance(
                config_value(_C, key), float) else ""  # fmt: skip
            got = _TYPE_WORDS.get(given_type, given_type)
            given = " ".join(given.split())
            return ConfigError(f"{where}: {key} {given}: must be {RANGES[key].text}, not {got}{hint}")
        return ConfigError(f"{where}: {key} is a group of keys, not a key: set one of them, e.g. {key}.<KEY> <value>")
    return ConfigError(f"{where}: {with_nearest_keys(' '.join(text.split()))}")


def with_nearest_keys(message):
    """yacs's ``Non-existent (config) key: X`` with the nearest valid keys appended; others unchanged."""
    unknown = next((p for p in ("Non-existent config key: ", "Non-existent key: ") if message.startswith(p)), None)
    if unknown is None:
        return message
    key = message[len(unknown) :]
    nearest = difflib.get_close_matches(key, list(leaf_keys()), n=3, cutoff=0.6)
    return f"{message}" + (f"; did you mean {' or '.join(nearest)}?" if nearest else "")


def _rename_in_tree(tree, alias, key, where):
    """Move ``alias`` (a dotted key) of the nested dict ``tree`` to ``key``, its current name."""
    *path, alias_leaf = alias.split(".")
    node = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or alias_leaf not in node:
        return
    value = node.pop(alias_leaf)
    key_leaf = key.split(".")[-1]  # an alias lives in its key's node
    if key_leaf in node and node[key_leaf] != value:
        raise ConfigError(f"{where}: {alias} {value} and {key} {node[key_leaf]} are the same key: set only {key}")
    node[key_leaf] = value


def _opts_value(text):
    """The value an --opts item stands for, to compare with another's (yacs reads it the same way)."""
    return CN._decode_cfg_value(text)


def canonical_opts(opts):
    """``--opts`` KEY VALUE pairs with every alias replaced by its key (KEY_ALIASES); ConfigError
    when the list is odd, or sets a key and its alias to different values."""
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs, got an odd number of items: {opts}")
    keys, values = list(opts[0::2]), list(opts[1::2])
    for alias, key in KEY_ALIASES.items():
        by_alias = [_opts_value(v) for k, v in zip(keys, values) if k == alias]
        by_key = [_opts_value(v) for k, v in zip(keys, values) if k == key]
        if by_alias and by_key and by_alias[-1] != by_key[-1]:
            raise ConfigError(
                f"--opts sets {alias} {by_alias[-1]} and {key} {by_key[-1]}, the same key: set only {key}"
            )
        keys = [key if k == alias else k for k in keys]
    return [item for pair in zip(keys, values) for item in pair]


def opts_keys(args):
    """The config keys ``args.opts`` sets explicitly (aliases under their current names)."""
    return set(canonical_opts(getattr(args, "opts", None) or [])[0::2])


def _name_number(x):
    """How run names write a number: 0.2 -> "02", 0.0 -> "0", 0.996 -> "0996", 4096 -> "4096"."""
    return f"{x:g}".replace(".", "") if _is_number(x) else str(x)  # anything else is refused later


def run_name(config):
    """The run name the settings spell, e.g. ``synco__swin_tiny__odpr02_tdpr0_cm099_ct02_queue4096_proj2_pred2``:
    framework, encoder, drop path of the online / target encoder, a frozen ViT patch projection,
    a ViT patch size other than 16, a ResNet's CIFAR stem, target momentum, temperature and queue
    (MoBY, SynCo), projector and predictor layers."""
    m = config.MODEL
    settings = [f"odpr{_name_number(m.ONLINE_DROP_PATH_RATE)}", f"tdpr{_name_number(m.TARGET_DROP_PATH_RATE)}"]
    if m.STOP_GRAD_CONV1:
        settings.append("stopgradconv1")
    if m.ENCODER.startswith("vit") and m.VIT.PATCH_SIZE != 16:
        settings.append(f"patch{_name_number(m.VIT.PATCH_SIZE)}")
    if m.ENCODER.startswith("resnet") and m.RESNET.CIFAR_STEM:
        settings.append("cifarstem")
    settings.append(f"cm{_name_number(m.CONTRAST_MOMENTUM)}")
    if m.TYPE in ("moby", "synco"):
        settings += [f"ct{_name_number(m.CONTRAST_TEMPERATURE)}", f"queue{_name_number(m.CONTRAST_NUM_NEGATIVE)}"]
    settings += [f"proj{m.PROJ_NUM_LAYERS}", f"pred{m.PRED_NUM_LAYERS}"]
    return f"{m.TYPE}__{m.ENCODER}__{'_'.join(settings)}"


# the keys run_name spells (those of MoBY / SynCo only appear in their names)
NAME_KEYS = (
    "MODEL.TYPE", "MODEL.ENCODER", "MODEL.ONLINE_DROP_PATH_RATE", "MODEL.TARGET_DROP_PATH_RATE",
    "MODEL.STOP_GRAD_CONV1", "MODEL.VIT.PATCH_SIZE", "MODEL.RESNET.CIFAR_STEM", "MODEL.CONTRAST_MOMENTUM",
    "MODEL.CONTRAST_TEMPERATURE", "MODEL.CONTRAST_NUM_NEGATIVE", "MODEL.PROJ_NUM_LAYERS", "MODEL.PRED_NUM_LAYERS",
)  # fmt: skip


def update_config(config, args, recipe=None):
    """Merge ``args.cfg``, then ``recipe`` (KEY VALUE list of a script's own defaults),
    then ``args.opts`` (aliases renamed: KEY_ALIASES), then the command-line flags into ``config``.
    ConfigError for a value outside its key's range (RANGES), before names and folders are made of
    the values. MODEL.NAME, unless the user named the run, becomes ``run_name`` of the result;
    OUTPUT the run's own folder OUTPUT/MODEL.NAME/TAG."""
    if getattr(args, "cfg", None):
        _update_config_from_file(config, args.cfg)

    config.defrost()
    if recipe:
        config.merge_from_list(recipe)
    # a name that spells the --cfg file's settings (or none) follows the settings --opts change
    name_follows_settings = config.MODEL.NAME in ("", run_name(config))
    opts = canonical_opts(getattr(args, "opts", None) or [])
    _check_opts_keys(opts[0::2])
    try:
        config.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError, TypeError) as e:
        raise _merge_error("--opts", e) from None

    for flag, key in _FLAG_KEYS.items():  # typed by argparse: set as given (--tag 123 stays a string)
        value = getattr(args, flag, None)
        if value is not None and value is not False:
            *path, leaf = key.split(".")
            (config_value(config, ".".join(path)) if path else config)[leaf] = value
    local_rank = getattr(args, "local_rank", None)
    config.LOCAL_RANK = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", 0))
    check_ranges(config)  # before the names and folders made of the values

    if name_follows_settings and "MODEL.NAME" not in opts[0::2]:
        config.MODEL.NAME = run_name(config)

    # the run's own folder
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def check_config(config):
    """Raise ConfigError naming the key and the fix for settings that cannot work: a value outside
    its key's range (RANGES), then the rules across keys."""
    check_ranges(config)
    m = config.MODEL
    if m.TYPE == "synco" and m.N_HARD > m.CONTRAST_NUM_NEGATIVE:
        raise ConfigError(
            f"MODEL.N_HARD {m.N_HARD} must be in 1..MODEL.CONTRAST_NUM_NEGATIVE ({m.CONTRAST_NUM_NEGATIVE})"
        )
    if config.TRAIN.START_EPOCH >= config.TRAIN.EPOCHS:
        raise ConfigError(
            f"TRAIN.START_EPOCH {config.TRAIN.START_EPOCH} must be below TRAIN.EPOCHS {config.TRAIN.EPOCHS}: "
            "the run would train no epoch"
        )
    if m.ENCODER.startswith("vit") and config.DATA.IMG_SIZE % m.VIT.PATCH_SIZE:
        size, patch = config.DATA.IMG_SIZE, m.VIT.PATCH_SIZE
        raise ConfigError(
            f"DATA.IMG_SIZE {size} is not a multiple of MODEL.VIT.PATCH_SIZE {patch}: set DATA.IMG_SIZE to "
            f"{max(patch, size // patch * patch)} or MODEL.VIT.PATCH_SIZE to a divisor of {size}"
        )
    if m.ENCODER.startswith("swin"):
        from models.swin_transformer import stage_window_sizes  # torch loads once the arguments are parsed

        try:
            stage_window_sizes(config.DATA.IMG_SIZE)
        except ValueError as e:
            raise ConfigError(f"DATA.IMG_SIZE {config.DATA.IMG_SIZE} does not fit {m.ENCODER}'s windows: {e}") from None


def inert_settings(config, pretraining):
    """Warnings (one line each) for settings that are accepted but silently do nothing: the
    learning rate's warm-up as long as the run and, when ``pretraining``, SynCo's synthetic
    negatives outside the run (which then is MoBY)."""
    warnings = []
    t, m = config.TRAIN, config.MODEL
    if 0 < t.EPOCHS <= t.WARMUP_EPOCHS:
        warnings.append(
            f"TRAIN.WARMUP_EPOCHS {t.WARMUP_EPOCHS} >= TRAIN.EPOCHS {t.EPOCHS}: the learning rate never leaves "
            "its linear warm-up (it never reaches TRAIN.BASE_LR and never decays); make TRAIN.WARMUP_EPOCHS "
            "smaller than TRAIN.EPOCHS"
        )
    if pretraining and m.TYPE == "synco":
        first, last = max(m.SYNTHETIC_START_EPOCH, 0), min(m.SYNTHETIC_END_EPOCH, t.EPOCHS - 1)
        if first > last:
            warnings.append(
                f"SynCo's synthetic negatives never switch on: MODEL.SYNTHETIC_START_EPOCH {m.SYNTHETIC_START_EPOCH} "
                f"to MODEL.SYNTHETIC_END_EPOCH {m.SYNTHETIC_END_EPOCH} includes none of the run's epochs 0 to "
                f"{t.EPOCHS - 1}, so this run is MoBY; set a window within the run"
            )
        elif not any(getattr(m, f"N{i}") for i in range(1, 7)):
            warnings.append("MODEL.N1..N6 are all 0: SynCo adds no synthetic negatives, so this run is MoBY")
    return warnings


def get_config(args=None, recipe=None):
    """Defaults under ``recipe`` (a script's own defaults), merged with ``args`` (an argparse
    namespace) when given; frozen."""
    config = _C.clone()
    if args is not None:
        update_config(config, args, recipe)
    else:
        config.merge_from_list(recipe or [])
        config.MODEL.NAME = run_name(config)
        config.freeze()
    return config
