"""The command line of every entry script, its output folder, and the process runner.

An entry script (``main_pretrain.py``, ``main_linear.py``, ``eval_*.py``) reads::

    def parse_option(argv=None):
        return build_parser(...).parse_args(argv)

    if __name__ == "__main__":
        parse_option()   # --help and a wrong flag answer before torch loads

    import torch ...     # the library modules
    def setup(argv):     # parse, configure, validate, join the processes, open the output folder
        ...
        return config, env, logger
    def main(config, env, logger): ...   # build, loop, save
    if __name__ == "__main__":
        run_cli(setup, main)

This module imports torch and the modules built on it only inside ``open_output`` and
``run_cli``, for the same reason.
"""

import argparse
import json
import os
import sys

import yaml

from config import RANGES, ConfigError, ListOf, get_config


def in_range(key, convert):
    """An argparse ``type`` for a flag that sets the config key ``key``: ``convert`` (int, float), then
    what config.RANGES allows for the key (for each item of a list key). A wrong value is argparse's
    usage error, before torch loads."""
    allowed = RANGES[key].item if isinstance(RANGES[key], ListOf) else RANGES[key]

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"{key} must be {allowed.text}, got {text!r}")
        return value

    return parse


def build_parser(prog, description, example, defaults=None, data=True, training=True, throughput=True):
    """The flags of an entry script: those of every script, with ``data`` the image-folder flags
    (``--data-path``, ``--zip``, ``--cache-mode``), with ``training`` those of a training run
    (``--resume``, ``--accumulation-steps``, ``--use-checkpoint``), with ``throughput`` ``--throughput``.
    ``defaults``: the config the flags override before ``--cfg`` (config.py's defaults, under a
    script's own recipe), shown in ``--help``; ``example``: a command line shown at the end of ``--help``."""
    defaults = defaults or get_config()

    def default(key):
        node = defaults
        for part in key.split("."):
            node = node[part]
        return f"{key}; default {node!r} unless --cfg or --opts set it"

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cfg", type=str, required=True, metavar="FILE", help="YAML config file (configs/*.yaml)")
    parser.add_argument(
        "--opts", default=None, nargs="+", metavar="KEY VALUE",
        help="override config keys, e.g. --opts DATA.IMG_SIZE 128 TRAIN.EPOCHS 100",
    )  # fmt: skip
    parser.add_argument(
        "--batch-size",
        type=in_range("DATA.BATCH_SIZE", int),
        metavar="N",
        help=f"images per process ({default('DATA.BATCH_SIZE')})",
    )
    if data:
        parser.add_argument(
            "--data-path", type=str, metavar="PATH",
            help="dataset folder (DATA.DATA_PATH): ImageNet's has train/ and val/",
        )  # fmt: skip
        parser.add_argument("--zip", action="store_true", help="read train.zip + train_map.txt (DATA.ZIP_MODE)")
        parser.add_argument(
            "--cache-mode", type=str, choices=["no", "full", "part"], help=f"zip cache ({default('DATA.CACHE_MODE')})",
        )  # fmt: skip
    if training:
        parser.add_argument(
            "--resume", metavar="FILE", help="resume from this checkpoint (default: the run folder's newest)"
        )
        parser.add_argument(
            "--accumulation-steps", type=in_range("TRAIN.ACCUMULATION_STEPS", int), metavar="N",
            help=f"gradient accumulation steps ({default('TRAIN.ACCUMULATION_STEPS')})",
        )  # fmt: skip
        parser.add_argument("--use-checkpoint", action="store_true", help="gradient checkpointing to save memory")
        parser.add_argument(
            "--accept-changes", action="store_true",
            help="resume a run whose schedule, batch or model settings differ from its checkpoint's "
            "(e.g. more TRAIN.EPOCHS to extend it); without it such a restart is refused (ACCEPT_CHANGES)",
        )  # fmt: skip
    parser.add_argument(
        "--amp-opt-level", type=str, choices=["O0", "O1", "O2"],
        help="precision: O0 fp32, O1 fp16 autocast with a grad scaler, O2 bf16 autocast (AMP_OPT_LEVEL; "
        "default O0, fp32 on every device, CPUs included; the level used is logged and saved in config.json)",
    )  # fmt: skip
    parser.add_argument(
        "--output", type=str, metavar="PATH",
        help=f"root of the output folders <output>/<MODEL.NAME>/<tag> ({default('OUTPUT')})",
    )  # fmt: skip
    parser.add_argument("--tag", help=f"name of the run under <output>/<MODEL.NAME> ({default('TAG')})")
    if throughput:
        parser.add_argument(
            "--throughput", action="store_true",
            help="measure images/s on synthetic batches of the configured size and exit; "
            "prints the last line 'throughput: <images/s>'",
        )  # fmt: skip
    parser.add_argument(
        "--trust-checkpoint", action="store_true",
        help="unpickle checkpoints in full (can run code): only for files you trust",
    )  # fmt: skip
    # torch.distributed.launch passes --local-rank (or --local_rank); torchrun sets LOCAL_RANK
    parser.add_argument(
        "--local-rank", "--local_rank", dest="local_rank", type=in_range("LOCAL_RANK", int), help=argparse.SUPPRESS
    )
    return parser


def open_output(config, env, folder, name, notes=(), warnings=()):
    """Create ``folder`` with the per-rank logger, and the resolved config.json on rank 0; log
    ``notes`` (lines about the configuration made before the logger existed) and, on rank 0,
    ``warnings`` (e.g. config.inert_settings) as WARNING lines."""
    from logger import create_logger
    from precision import precision_line, set_tf32

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the output folder {folder}: {e.strerror}") from None
    logger = create_logger(folder, env.rank, name=name)
    if env.is_main:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(yaml.safe_load(config.dump()), f, indent=2)
        logger.info(f"full config saved to {os.path.join(folder, 'config.json')}")
    logger.info(f"rank {env.rank} of {env.world_size} on {env.device}")
    set_tf32(config, env.device)
    logger.info(precision_line(config, env.device))
    for line in notes:
        logger.info(line)
    for line in warnings if env.is_main else ():
        logger.warning(line)
    return logger


def run_cli(setup_fn, main_fn, argv=None):
    """Run ``main_fn(*setup_fn(argv))``; expected failures print one line and exit 2. A process
    whose ``main_fn`` fails tells the others (``mark_group_failed`` in the store of the DistEnv
    ``setup_fn`` returned: see faults.StopSignal)."""
    import torch

    from checkpoint import CheckpointWriteError
    from data.cached_image_folder import UnreadableImageError
    from distributed import DistEnv, launcher_env, mark_group_failed
    from faults import NonFiniteLossError, ProcessFaultError, end_loader_workers, hold_while_exiting

    rank = launcher_env()[0]
    try:
        values = setup_fn(argv)
        env = next((v for v in values if isinstance(v, DistEnv)), None)
        try:
            main_fn(*values)
        except Exception as e:
            hold_while_exiting()  # an error the exit of another thread caused is not the run's
            text = " ".join(str(e).split()) or type(e).__name__
            mark_group_failed(env and env.store, text if text.startswith(f"rank {rank} ") else f"rank {rank}: {text}")
            raise
    except (ConfigError, FileNotFoundError, PermissionError, NonFiniteLossError, CheckpointWriteError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (ProcessFaultError, UnreadableImageError) as e:  # the rank that met it says so
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C where no StopSignal saves first (evaluations, start-up)
        print(f"error: rank {rank} stopped by SIGINT (Ctrl-C)", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        end_loader_workers()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
