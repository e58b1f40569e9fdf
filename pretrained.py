"""The pretrained encoder of a run, for evaluation: which checkpoint, its encoder settings, its weights.

    held, notes = inherit_encoder_settings(config, args, env)   # in setup, before the config is read
    epoch = load_run_encoder(model, config, logger, held)        # in main, once the model is built

Evaluation reads LINEAR_EVAL.PRETRAINED (a checkpoint file or a run folder) or else the run folder
OUTPUT (<output>/<MODEL.NAME>/<tag>), by the rule auto-resume reads by (``newest_checkpoint``).
"""

import glob
import json
import logging
import logging.handlers
import os
from dataclasses import dataclass, field

from checkpoint import lookup, read_checkpoint, read_run_checkpoint, stored_config
from config import _C, NAME_KEYS, ConfigError, config_value, opts_keys
from distributed import broadcast_object
from models.build import ENCODER_SHAPE_KEYS, FAMILY_SHAPE_KEYS, encoder_shape_keys
from models.convert import convert_original_encoder


@dataclass
class HeldCheckpoint:
    """The checkpoint evaluation took the encoder's settings from: ``path`` (None without one), its
    content (rank 0 only; the other ranks read ``path`` when they load it) and the log records of
    the unreadable files skipped to find it. One read of a file that may hold a gigabyte, and on
    every rank the weights of the very file whose settings were taken, even while a run saves newer
    checkpoints into the folder."""

    path: str | None
    ckpt: dict | None = None
    skipped: list = field(default_factory=list)


def load_pretrained_encoder(model, path, encoder_name, ckpt=None, trust=False):
    """Copy the online encoder of a pretraining checkpoint into ``model`` (all but its head);
    returns its pretraining epoch. ``ckpt``: the checkpoint, when already read from ``path``.

    Checkpoints of the original MoBY / SynCo-v2 code are converted (``models/convert.py``).
    Raises ConfigError naming the path and the keys when the checkpoint is missing,
    unreadable, refused (``trust``: see utils.read_checkpoint), from another backbone,
    or has no ``encoder.*`` weights.
    """
    if ckpt is None:
        if not os.path.isfile(path):
            raise ConfigError(
                f"no pretrained checkpoint at {path}: pretrain with the same --cfg, --opts, --output and --tag "
                "first, or set LINEAR_EVAL.PRETRAINED"
            )
        ckpt = read_checkpoint(path, trust)
    check_original_encoder(path, ckpt)
    found = ckpt.get("framework", {}).get("encoder", encoder_name)
    if found != encoder_name:
        raise ConfigError(f"{path} holds a {found} encoder, but MODEL.ENCODER is {encoder_name}")
    state = ckpt.get("model", ckpt)
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    if not encoder:
        raise ConfigError(f"{path} has no encoder.* weights (keys: {', '.join(list(state)[:5])}, ...)")
    encoder = convert_original_encoder(encoder, encoder_name)
    head_params = {id(p) for p in model.get_classifier().parameters()}
    head = {n for n, p in model.named_parameters() if id(p) in head_params}
    encoder = {k: v for k, v in encoder.items() if k not in head}  # a pretraining head is never reused
    own = model.state_dict()
    mismatched = [k for k, v in encoder.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(encoder) - head)
    unexpected = sorted(set(encoder) - set(own))
    if mismatched or missing or unexpected:
        raise ConfigError(
            f"{path} does not match {encoder_name}: mismatched shapes {mismatched[:5]}, "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.load_state_dict(encoder, strict=False)
    return ckpt.get("epoch")


def load_run_encoder(model, config, logger, held=None):
    """Load into ``model`` the online encoder of LINEAR_EVAL.PRETRAINED (a checkpoint file, or a
    run folder) or else of the run folder OUTPUT: ``held``, the checkpoint inherit_encoder_settings
    took the settings from, or else a folder's newest readable checkpoint, as auto-resume picks it.
    Logs the file and epoch; returns the epoch."""
    if held is None:
        path, ckpt = read_run_checkpoint(pretrained_source(config), logger, config.TRUST_CHECKPOINT)
    else:
        path, ckpt = held.path, held.ckpt
        for record in held.skipped:
            logger.log(record.levelno, record.getMessage())
        if ckpt is None and path is not None:  # a rank other than 0
            ckpt = read_checkpoint(path, config.TRUST_CHECKPOINT)
    if ckpt is None:
        raise missing_checkpoint_error(config)
    epoch = load_pretrained_encoder(model, path, config.MODEL.ENCODER, ckpt)
    logger.info(f"loaded the encoder of {path} (pretraining epoch {epoch})")
    return epoch


def pretrained_source(config):
    """What evaluation reads the encoder from: LINEAR_EVAL.PRETRAINED, else the run folder OUTPUT."""
    return config.LINEAR_EVAL.PRETRAINED or config.OUTPUT


def runs_with_tag(config):
    """The run folders <output>/*/<tag> other than OUTPUT that hold checkpoints, sorted."""
    root = os.path.dirname(os.path.dirname(config.OUTPUT))
    return [
        folder
        for folder in sorted(glob.glob(os.path.join(glob.escape(root), "*", glob.escape(config.TAG))))
        if folder != config.OUTPUT and glob.glob(os.path.join(glob.escape(folder), "*.pth"))
    ]


def the_only_run_with_tag(config):
    """The one run folder with this config's tag, framework and encoder (``runs_with_tag``, by their
    config.json) when there is exactly one, else None: a run pretrained with a setting that names
    the run (``--opts MODEL.CONTRAST_NUM_NEGATIVE 64``) and evaluated without it."""
    wanted = (config.MODEL.TYPE, config.MODEL.ENCODER)
    runs = {folder: _run_config(folder) for folder in runs_with_tag(config)}
    matching = [f for f, ran in runs.items() if (lookup(ran, "MODEL.TYPE"), lookup(ran, "MODEL.ENCODER")) == wanted]
    return matching[0] if len(matching) == 1 else None


def _run_config(folder):
    """The config.json of a run folder as nested dicts; {} without a readable one."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def missing_checkpoint_error(config):
    """The ConfigError for a pretrained checkpoint that is not there; when the run folder was
    expected at OUTPUT (<output>/<MODEL.NAME>/<tag>), it names the run folders with the same
    tag that hold checkpoints, and the named settings they ran with that differ from this config
    (a run pretrained with e.g. --opts MODEL.CONTRAST_NUM_NEGATIVE 64 has that in its name)."""
    source = pretrained_source(config)
    others = ""
    if not config.LINEAR_EVAL.PRETRAINED:
        runs = runs_with_tag(config)
        described = [f"{folder}{_named_differences(config, folder)}" for folder in runs[:3]]
        if runs:
            more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""
            others = f"; runs with tag {config.TAG!r}: {', '.join(described)}{more}"
    return ConfigError(
        f"no pretrained checkpoint at {source} (a file, or a run folder with checkpoint.pth or ckpt_epoch_E.pth)"
        f"{others}: pretrain first, or evaluate with the --cfg, --opts, --output and --tag of the pretraining, "
        "or set LINEAR_EVAL.PRETRAINED"
    )


def _named_differences(config, folder):
    """`` (pretrained with --opts KEY VALUE ...)``: the settings of MODEL.NAME (NAME_KEYS) in which the
    run ``folder``'s config.json differs from ``config``; empty without a readable config.json."""
    theirs = _run_config(folder)
    differences = []
    for key in NAME_KEYS:
        value = lookup(theirs, key)
        if value is not None and value != lookup(config, key):
            differences.append(f"{key} {value}")
    return f" (pretrained with --opts {' '.join(differences)})" if differences else ""


def inherit_encoder_settings(config, args, env):
    """Set the settings that shape the encoder (models.build.ENCODER_SHAPE_KEYS: the backbone, the
    image size, a ViT's patch size, a ResNet's stem) to those stored in the config of the checkpoint
    evaluation reads (``load_run_encoder``'s rule); returns (the HeldCheckpoint for ``load_run_encoder``,
    or None; the lines to log: open_output's ``notes``).

    The checkpoint's values replace those of the defaults and of --cfg (the YAML recalls the run,
    the checkpoint is what ran); one that ``args.opts`` sets to another value is a ConfigError
    naming both. A checkpoint without a stored config (a plain state dict) leaves the config as
    it is; the original code's (nested dicts) is read like ours (a YAML dump); so does a missing one
    (load_run_encoder says so; --throughput needs none). Call after join_processes, before anything
    reads the config: rank 0 reads the checkpoint, the other ranks take what it read, so every
    rank builds the same encoder.
    """
    if config.THROUGHPUT_MODE:
        return None, []
    # rank 0: (path, stored settings, the run folder taken instead of OUTPUT or None) of the
    # checkpoint, or the error
    found = None
    held = None
    if env.is_main:
        try:
            held = _read_quietly(pretrained_source(config), config.TRUST_CHECKPOINT)
            other_run = None
            if held.ckpt is None and not config.LINEAR_EVAL.PRETRAINED:
                other_run = the_only_run_with_tag(config)
                if other_run is not None:
                    held = _read_quietly(other_run, config.TRUST_CHECKPOINT)
            if held.ckpt is None:
                raise missing_checkpoint_error(config)
            check_original_encoder(held.path, held.ckpt)
            found = (held.path, _stored_encoder_settings(held.ckpt), other_run)
        except Exception as e:  # the other ranks raise it too
            found = e
    found = broadcast_object(found, env)
    if isinstance(found, Exception):
        raise found
    path, stored, other_run = found
    notes = []
    if other_run is not None:
        notes.append(
            f"no run at {config.OUTPUT}; the only {config.MODEL.TYPE} / {config.MODEL.ENCODER} run with tag "
            f"{config.TAG!r} under the output folder is {other_run}{_named_differences(config, other_run)}: "
            "evaluating it, its results in its folder"
        )
        config.defrost()
        config.OUTPUT, config.MODEL.NAME = other_run, os.path.basename(os.path.dirname(other_run))
        config.freeze()
    if not env.is_main:
        held = HeldCheckpoint(path)
    current = {key: lookup(config, key) for key in ENCODER_SHAPE_KEYS}
    settings = ", ".join(f"{key} {current[key]}" for key in encoder_shape_keys(config.MODEL.ENCODER))
    if stored is None:
        return held, [*notes, f"{path} stores no config: the encoder is built from --cfg and --opts ({settings})"]
    explicit = opts_keys(args)
    changes = {key: value for key, value in stored.items() if value != current[key]}
    for key, value in changes.items():
        if key in explicit:
            raise ConfigError(
                f"--opts {key} {current[key]} contradicts {path}, pretrained with {key} {value}: "
                "drop it from --opts (evaluation takes the checkpoint's), or evaluate another checkpoint"
            )
    if not changes:
        return held, [*notes, f"encoder settings as in the config of {path}: {settings}"]
    config.defrost()
    config.merge_from_list([item for key_value in changes.items() for item in key_value])
    config.freeze()
    taken = ", ".join(f"{key}: {current[key]} -> {value}" for key, value in changes.items())
    return held, [
        *notes,
        f"from the config of {path}: {taken} (the checkpoint's settings replace those of --cfg and the defaults)",
    ]


def _read_quietly(source, trust):
    """``read_run_checkpoint(source)`` as a HeldCheckpoint, with the log records of the files it
    skipped: load_run_encoder logs them, with the evaluation's logger, once it exists."""
    skipped = logging.handlers.BufferingHandler(capacity=1000)
    reader = logging.Logger("pretrained.settings_read")  # not registered: its records wait in ``skipped``
    reader.addHandler(skipped)
    path, ckpt = read_run_checkpoint(source, reader, trust)
    return HeldCheckpoint(path, ckpt, skipped.buffer)


def check_original_encoder(path, ckpt):
    """Refuse MoBY's released DeiT-S checkpoints (Transformer-SSL: MODEL.MOBY.ENCODER deit_small):
    their 6-head attention has the parameter shapes of this project's 12-head vit_small (MoCo v3's),
    so its weights would load without an error and give wrong features."""
    stored = stored_config(ckpt) or {}
    encoder = lookup(stored, "MODEL.MOBY.ENCODER") or lookup(stored, "MODEL.ENCODER")
    if isinstance(encoder, str) and encoder.startswith("deit"):
        raise ConfigError(
            f"{path} holds a {encoder} encoder (MoBY's DeiT with 6 attention heads), which no encoder of this "
            "project has: vit_small has MoCo v3's 12 heads, and the weights would load into it with a wrong "
            "attention layout"
        )


def _stored_encoder_settings(ckpt):
    """{key: value} of the ENCODER_SHAPE_KEYS of its encoder in the checkpoint's stored config; None
    when it stores none. A family's key it lacks (a run from before the key) takes the default it
    ran with (patch 16, the standard stem); another key it lacks is left out."""
    stored = stored_config(ckpt)
    if stored is None:
        return None
    values = {key: lookup(stored, key) for key in encoder_shape_keys(lookup(stored, "MODEL.ENCODER"))}
    values.update({key: config_value(_C, key) for key in FAMILY_SHAPE_KEYS if key in values and values[key] is None})
    return {key: value for key, value in values.items() if value is not None} or None
