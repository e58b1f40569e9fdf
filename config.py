"""The configuration tree: every key, its default and its meaning.

YAML files under ``configs/`` hold only overrides and may inherit from other
files with ``BASE: ['other.yaml']``. ``get_config(args)`` clones the defaults,
merges the YAML file, then the command-line flags, then ``--opts``, and freezes.
"""

import os

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
# Dataset name ("imagenet" for pretraining; main_linear.py also takes transfer sets)
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
# Backbone: swin_tiny, swin_small, swin_base, vit_tiny, vit_small, vit_base, resnet50, resnet101, resnet152, resnet200
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
# Seconds a process waits in a collective (or for the others to join) before it stops
# with an error naming its rank and step: a stalled or dead peer then ends the run
# instead of hanging it. Long enough for the slowest save and evaluation.
_C.DIST_TIMEOUT = 1800
# Random seed (offset by the rank)
_C.SEED = 0
# Only evaluate (main_linear.py)
_C.EVAL_MODE = False
# Only measure throughput
_C.THROUGHPUT_MODE = False
# Local rank of this process (from the launcher)
_C.LOCAL_RANK = 0

AMP_LEVELS = ("", "O0", "O1", "O2")
SSL_AUG_TYPES = ("byol", "simclr")
RESAMPLINGS = ("bilinear", "bicubic", "nearest")


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
    "dump_features": "RETRIEVAL.DUMP_FEATURES",
    "load_features": "RETRIEVAL.LOAD_FEATURES",
    "nb_knn": "KNN.NB_KNN",
    "temperature": "KNN.TEMPERATURE",
    "knn_dump_features": "KNN.DUMP_FEATURES",
    "knn_load_features": "KNN.LOAD_FEATURES",
}


# an earlier name of a key -> its name; accepted in YAML files and --opts (the original's configs use them)
KEY_ALIASES = {
    "MODEL.WARMUP_EPOCHS": "MODEL.SYNTHETIC_START_EPOCH",
    "MODEL.COOLDOWN_EPOCHS": "MODEL.SYNTHETIC_END_EPOCH",
}


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


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
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"{cfg_file}: {e.args[0]}") from None
    config.freeze()


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


def canonical_opts(opts):
    """``--opts`` KEY VALUE pairs with every alias replaced by its key (KEY_ALIASES); ConfigError
    when the list is odd, or sets a key and its alias to different values."""
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs, got an odd number of items: {opts}")
    keys, values = list(opts[0::2]), list(opts[1::2])
    for alias, key in KEY_ALIASES.items():
        by_alias = [yaml.safe_load(str(v)) for k, v in zip(keys, values) if k == alias]
        by_key = [yaml.safe_load(str(v)) for k, v in zip(keys, values) if k == key]
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
    return f"{x:g}".replace(".", "")


def run_name(config):
    """The run name the settings spell, e.g. ``synco__swin_tiny__odpr02_tdpr0_cm099_ct02_queue4096_proj2_pred2``:
    framework, encoder, drop path of the online / target encoder, a frozen ViT patch projection,
    target momentum, temperature and queue (MoBY, SynCo), projector and predictor layers."""
    m = config.MODEL
    settings = [f"odpr{_name_number(m.ONLINE_DROP_PATH_RATE)}", f"tdpr{_name_number(m.TARGET_DROP_PATH_RATE)}"]
    if m.STOP_GRAD_CONV1:
        settings.append("stopgradconv1")
    settings.append(f"cm{_name_number(m.CONTRAST_MOMENTUM)}")
    if m.TYPE in ("moby", "synco"):
        settings += [f"ct{_name_number(m.CONTRAST_TEMPERATURE)}", f"queue{_name_number(m.CONTRAST_NUM_NEGATIVE)}"]
    settings += [f"proj{m.PROJ_NUM_LAYERS}", f"pred{m.PRED_NUM_LAYERS}"]
    return f"{m.TYPE}__{m.ENCODER}__{'_'.join(settings)}"


# the keys run_name spells (those of MoBY / SynCo only appear in their names)
NAME_KEYS = (
    "MODEL.TYPE", "MODEL.ENCODER", "MODEL.ONLINE_DROP_PATH_RATE", "MODEL.TARGET_DROP_PATH_RATE",
    "MODEL.STOP_GRAD_CONV1", "MODEL.CONTRAST_MOMENTUM", "MODEL.CONTRAST_TEMPERATURE",
    "MODEL.CONTRAST_NUM_NEGATIVE", "MODEL.PROJ_NUM_LAYERS", "MODEL.PRED_NUM_LAYERS",
)  # fmt: skip


def update_config(config, args, recipe=None):
    """Merge ``args.cfg``, then ``recipe`` (KEY VALUE list of a script's own defaults),
    then ``args.opts`` (aliases renamed: KEY_ALIASES), then the command-line flags into ``config``.
    MODEL.NAME, unless the user named the run, becomes ``run_name`` of the result; OUTPUT the
    run's own folder OUTPUT/MODEL.NAME/TAG."""
    if getattr(args, "cfg", None):
        _update_config_from_file(config, args.cfg)

    config.defrost()
    if recipe:
        config.merge_from_list(recipe)
    # a name that spells the --cfg file's settings (or none) follows the settings --opts change
    name_follows_settings = config.MODEL.NAME in ("", run_name(config))
    opts = canonical_opts(getattr(args, "opts", None) or [])
    try:
        config.merge_from_list(opts)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"--opts: {e.args[0]}") from None
    if name_follows_settings and "MODEL.NAME" not in opts[0::2]:
        config.MODEL.NAME = run_name(config)

    for flag, key in _FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None and value is not False:
            config.merge_from_list([key, value])
    local_rank = getattr(args, "local_rank", None)
    config.LOCAL_RANK = int(local_rank if local_rank is not None else os.environ.get("LOCAL_RANK", 0))

    if getattr(args, "lr", None) is not None:
        config.TRAIN.BASE_LR = args.lr
    if getattr(args, "drop_path_rate", None) is not None:
        config.MODEL.DROP_PATH_RATE = args.drop_path_rate

    # the run's own folder
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def check_config(config):
    """Raise ConfigError naming the key and the fix for settings that cannot work."""
    from models.build import ENCODERS, FRAMEWORKS  # the registry; torch loads once the arguments are parsed

    if config.MODEL.TYPE not in FRAMEWORKS:
        raise ConfigError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}; valid: {', '.join(FRAMEWORKS)}")
    if config.MODEL.ENCODER not in ENCODERS:
        raise ConfigError(f"unknown MODEL.ENCODER {config.MODEL.ENCODER!r}; valid: {', '.join(ENCODERS)}")
    if config.AUG.SSL_AUG_TYPE not in SSL_AUG_TYPES:
        raise ConfigError(f"unknown AUG.SSL_AUG_TYPE {config.AUG.SSL_AUG_TYPE!r}; valid: {', '.join(SSL_AUG_TYPES)}")
    if config.AUG.SSL_AUG_INTERPOLATION not in RESAMPLINGS:
        raise ConfigError(
            f"unknown AUG.SSL_AUG_INTERPOLATION {config.AUG.SSL_AUG_INTERPOLATION!r}; valid: {', '.join(RESAMPLINGS)}"
        )
    if config.AMP_OPT_LEVEL not in AMP_LEVELS:
        raise ConfigError(f"unknown AMP_OPT_LEVEL {config.AMP_OPT_LEVEL!r}; valid: O0, O1, O2")
    if config.MODEL.TYPE == "synco":
        n_negative = config.MODEL.CONTRAST_NUM_NEGATIVE
        if not 0 < config.MODEL.N_HARD <= n_negative:
            raise ConfigError(
                f"MODEL.N_HARD {config.MODEL.N_HARD} must be in 1..MODEL.CONTRAST_NUM_NEGATIVE ({n_negative})"
            )
        for i in range(1, 7):
            if getattr(config.MODEL, f"N{i}") < 0:
                raise ConfigError(f"MODEL.N{i} must be >= 0")


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
