"""The pretraining data loader: datasets, samplers, and reproducible augmentation.

A batch is ``((view1, view2), (params1, params2)), target``: views ``[B, 3, S, S]``
uint8 and their augmentation parameters ``[B, NUM_PARAMS]`` (``data/augment.py``).
``DeviceAugment`` turns a view into the normalised float input of the model on the
training device (and, with ``DATA.GPU_AUG``, applies the photometric operations there).

Reproducibility across a resume. The data of epoch ``e`` on rank ``r`` is a pure
function of (SEED, e, r):

* the order comes from the sampler, seeded with ``SEED + e`` (``set_epoch``);
* the augmentation of each sample is drawn from torch's global generator, but inside
  ``_SeededDataset.__getitem__`` that generator is re-seeded with
  ``derive_seed(SEED, e, r, index)`` and restored afterwards. The seed travels with the
  index (the sampler yields ``(index, seed)`` pairs from the main process), so it does
  not depend on which worker decodes the sample, on how many workers there are, on
  persistent workers carrying RNG state from earlier epochs, or on what the training
  loop does with the global generator: with ``num_workers=0`` the loop's own RNG
  stream is left untouched, and nothing needs to be saved or restored by the caller.

``set_loader_epoch`` must be called before iterating epoch ``e`` (in both a fresh and a
resumed run); it also re-seeds the loader's ``torch.Generator``, from which the workers'
base seeds are drawn, so nothing else random in a worker carries over between runs.

Unreadable images. In a training set (``seeded_loader``: pretraining and main_linear.py's
training set) a sample whose file cannot be decoded (``UNREADABLE_ERRORS``) is replaced by
``replacement_index(seed, attempt, n)``, a pure function of the slot's seed, and augmented
with that seed: the data stays a function of (SEED, e, r). Each bad file is logged once per
process (logger ``data.build``), and ``skipped_samples(loader)`` counts the replaced samples
since ``set_loader_epoch``, over all worker processes. A set that is measured whole (a
validation set, the sets k-NN extracts features of: ``StopOnUnreadable``) cannot lose or swap
a sample without changing what is measured: an unreadable image there raises
``UnreadableImageError`` naming the file, which ends the run with that one line.
"""

import bisect
import itertools
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets as tvd

from data.augment import build_ssl_transform
from data.cached_image_folder import (
    CACHE_MODES,
    UNREADABLE_ERRORS,
    CachedImageFolder,
    LenientImageFolder,
    UnlabelledImageFolder,
    UnreadableImageError,
    has_class_folders,
    open_image,
    pil_rgb_loader,
    shard_indices,
)
from distributed import get_rank, get_world_size
from utils import derive_seed

logger = logging.getLogger(__name__)

# Give up on a sample after this many unreadable images in a row: the data is broken.
MAX_ATTEMPTS = 100
# DATA.NUM_WORKERS -1 never starts more workers than this per process
MAX_AUTO_WORKERS = 16


class ShardSampler(Sampler[int]):
    """This rank's shard ``shard_indices(n, rank, world_size)``, reshuffled every epoch.

    Used with a 'part' cache, where each rank holds only its own shard in memory.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int = 0):
        self.indices = shard_indices(num_samples, rank, world_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])

    def __len__(self) -> int:
        return len(self.indices)


class SeededSampler(Sampler[tuple[int, int]]):
    """Wrap an index sampler to yield ``(index, derive_seed(seed, epoch, rank, index))``,
    from the ``start``-th of the epoch on (a run resumed inside an epoch)."""

    def __init__(self, sampler: DistributedSampler | ShardSampler, seed: int, rank: int):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in itertools.islice(self.sampler, self.start, None):
            yield index, derive_seed(self.seed, self.epoch, self.rank, index)

    def __len__(self) -> int:
        return len(self.sampler) - self.start


def replacement_index(seed: int, attempt: int, num_samples: int) -> int:
    """The index tried after ``attempt`` + 1 unreadable images in the slot seeded ``seed``."""
    return derive_seed(seed, attempt) % num_samples


def sample_source(dataset: Dataset, index: int) -> str:
    """Where sample ``index`` of ``dataset`` is read from, for messages: its file (or zip member),
    through ``Subset`` and ``ConcatDataset``, for this package's datasets and torchvision's."""
    if isinstance(dataset, Subset):
        return sample_source(dataset.dataset, dataset.indices[index])
    if isinstance(dataset, ConcatDataset):
        part = bisect.bisect_right(dataset.cumulative_sizes, index)
        start = dataset.cumulative_sizes[part - 1] if part else 0
        return sample_source(dataset.datasets[part], index - start)
    if hasattr(dataset, "source"):
        return dataset.source(index)
    if isinstance(dataset, tvd.Caltech101):  # it keeps no paths
        category = dataset.categories[dataset.y[index]]
        return os.path.join(dataset.root, "101_ObjectCategories", category, f"image_{dataset.index[index]:04d}.jpg")
    # the attribute differs between classes: (path, target) pairs or paths
    for attr in ("samples", "imgs", "_samples", "_image_files", "_images"):
        items = getattr(dataset, attr, None)
        if items is not None:
            item = items[index]
            return os.fspath(item[0] if isinstance(item, tuple) else item)
    return f"sample {index} of {type(dataset).__name__}"


class _SeededDataset(Dataset):
    """``dataset[index]`` with torch's global CPU generator seeded for that one call,
    unreadable images replaced (see the module docstring)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        # shared memory made before the workers start, so they all count into it
        self.skipped = multiprocessing.Value("q", 0)
        self._warned: set[int] = set()  # bad indices already logged by this process

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int):
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, seed = item
        generator = torch.default_generator
        state = generator.get_state()
        try:
            for attempt in range(MAX_ATTEMPTS):
                generator.manual_seed(seed)
                try:
                    return self.dataset[index]
                except UNREADABLE_ERRORS as e:
                    self._skip(index, e)
                index = replacement_index(seed, attempt, len(self.dataset))
            raise UnreadableImageError(
                f"{MAX_ATTEMPTS} unreadable images in a row, from {sample_source(self.dataset, item[0])}: "
                "is the data damaged?"
            )
        finally:
            generator.set_state(state)

    def _skip(self, index: int, error: Exception) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1
        if index not in self._warned:
            self._warned.add(index)
            source, reason = sample_source(self.dataset, index), " ".join(str(error).split())
            logger.warning(f"skipping unreadable image {source}: {type(error).__name__}: {reason}")


# The advice of the one line an unreadable image of a set measured whole ends the run with.
WHOLE_SET_ADVICE = "an evaluation set is measured whole, so no image is skipped: replace the file or remove it"


class StopOnUnreadable(Dataset):
    """``dataset`` for a set measured whole (a validation set, the sets of k-NN features): an
    unreadable image raises ``UnreadableImageError`` naming its file, rather than being skipped
    or replaced, which would change the set the accuracy is measured over."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except UNREADABLE_ERRORS as e:
            raise UnreadableImageError.of(sample_source(self.dataset, index), e, WHOLE_SET_ADVICE) from None


def build_dataset(
    config, transform, rank: int = 0, world_size: int = 1, split: str = "train", loader=pil_rgb_loader
) -> Dataset:
    """The ``split`` ("train" or "val") of the ImageNet-style set under ``config.DATA.DATA_PATH``,
    as a folder (``<split>/<class>/<image>``, or ``<split>/<image>`` without classes:
    ``UnlabelledImageFolder``) or, in zip mode, ``<split>.zip`` with ``<split>_map.txt``. ``loader`` turns a
    path or the bytes of a file into what ``transform`` takes (an RGB image by default).

    Raises:
        FileNotFoundError: ``DATA_PATH/<split>`` (folder mode, or it holds no image) or
            ``DATA_PATH/<split>.zip`` or ``DATA_PATH/<split>_map.txt`` (zip mode) is missing.
    """
    check_split(config, split)
    root = config.DATA.DATA_PATH
    if config.DATA.ZIP_MODE:
        zip_path = os.path.join(root, f"{split}.zip")
        map_path = os.path.join(root, f"{split}_map.txt")
        return CachedImageFolder(
            zip_path,
            map_path,
            transform=transform,
            cache_mode=config.DATA.CACHE_MODE,
            rank=rank,
            world_size=world_size,
            loader=loader,
        )
    folder = os.path.join(root, split)
    if not has_class_folders(folder):  # images straight under the split: a set without classes
        return UnlabelledImageFolder(folder, transform=transform, loader=loader)
    return LenientImageFolder(folder, transform=transform, loader=loader)


def check_split(config, split: str = "train") -> None:
    """Raise FileNotFoundError naming the layout when ``split`` of DATA.DATA_PATH is missing: the
    folder ``<split>/`` or, with DATA.ZIP_MODE, ``<split>.zip`` and ``<split>_map.txt``."""
    root = config.DATA.DATA_PATH
    if config.DATA.ZIP_MODE:
        zip_path = os.path.join(root, f"{split}.zip")
        map_path = os.path.join(root, f"{split}_map.txt")
        for path in (zip_path, map_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} not found: DATA.ZIP_MODE expects {zip_path} (the images) and "
                    f"{map_path} (lines '<path inside the zip>\\t<class index>')"
                )
    else:
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"{folder} not found: expected an ImageNet-style folder {folder}/<class>/<image> "
                f"(or set DATA.ZIP_MODE for {split}.zip + {split}_map.txt)"
            )


def shuffling_sampler(config, dataset: Sized, rank: int = 0, world_size: int = 1) -> DistributedSampler | ShardSampler:
    """This rank's share of ``dataset``, reshuffled each epoch (seeded with SEED + epoch), the same
    number of samples on every rank: a ``DistributedSampler`` without padding, or for a zip
    read with a 'part' cache the shard this rank holds in memory (``ShardSampler``)."""
    if getattr(dataset, "cache_mode", None) == "part":
        return ShardSampler(len(dataset), rank, world_size, seed=config.SEED)
    return DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=config.SEED, drop_last=True
    )


def build_sampler(config, dataset: Sized, rank: int = 0, world_size: int = 1) -> SeededSampler:
    """The shuffling sampler of this rank, yielding ``(index, augmentation seed)`` pairs."""
    return SeededSampler(shuffling_sampler(config, dataset, rank, world_size), seed=config.SEED, rank=rank)


def cpus_per_process() -> int:
    """CPU cores this process may use, shared with the other processes of its node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def resolve_num_workers(requested: int) -> int:
    """DATA.NUM_WORKERS as run: -1 is one fewer than the cores of this process (the process
    itself needs one) up to MAX_AUTO_WORKERS; a request above the cores is capped, with a warning."""
    cores = cpus_per_process()
    if requested < 0:
        return min(cores - 1, MAX_AUTO_WORKERS)
    if requested > cores:
        logger.warning(f"DATA.NUM_WORKERS {requested} capped to the {cores} CPU cores available to this process")
        return cores
    return requested


def ignore_stop_signals(worker_id: int) -> None:
    """Leave SIGTERM / SIGUSR1, which a scheduler sends to every process of a job, and SIGINT,
    which Ctrl-C sends to every process of the terminal's, to the training process: it stops the
    workers itself once it has saved."""
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def make_loader(
    config, dataset: Dataset, sampler: Sampler | None = None, drop_last: bool = False, persistent: bool = True,
    **kwargs,
) -> DataLoader:  # fmt: skip
    """The one DataLoader factory of every set: batches of DATA.BATCH_SIZE in ``sampler``'s order
    (the dataset's own without one), DATA.NUM_WORKERS workers as run (``resolve_num_workers``),
    kept between passes when ``persistent``, that leave stop signals to the training process;
    pinned memory with DATA.PIN_MEMORY on CUDA."""
    num_workers = resolve_num_workers(config.DATA.NUM_WORKERS)
    return DataLoader(
        dataset,
        batch_size=config.DATA.BATCH_SIZE,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=config.DATA.PIN_MEMORY and torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=persistent and num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        **kwargs,
    )


def build_loader(config, rank: int | None = None, world_size: int | None = None) -> tuple[Dataset, DataLoader]:
    """The pretraining set of DATA.DATASET (``build_pretrain_dataset``) and its loader of
    ``((view1, view2), (params1, params2)), target`` (see the module docstring). ``rank`` and
    ``world_size`` default to those of ``torch.distributed`` (0 and 1 without it). Call
    ``set_loader_epoch(loader, epoch)`` before each epoch.
    """
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        rank, world_size = get_rank(), get_world_size()
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE not in CACHE_MODES:
        raise ValueError(f"unknown DATA.CACHE_MODE {config.DATA.CACHE_MODE!r}; valid: {', '.join(CACHE_MODES)}")

    dataset = build_pretrain_dataset(config, build_ssl_transform(config), rank, world_size)
    return dataset, seeded_loader(config, dataset, rank, world_size)


def build_pretrain_dataset(config, transform, rank: int, world_size: int) -> Dataset:
    """The pretraining images of DATA.DATASET, items ``(transform(image), label)``: for imagenet and
    imagenet100 the ``train`` split under DATA.DATA_PATH (``build_dataset``; ``transform`` gets each
    image opened, not yet decoded), for a transfer set such as cifar10 its training part under
    DATA.TRANSFER_ROOT, downloaded there when missing (``data.linear.build_transfer_sets``;
    ``transform`` gets decoded images: torchvision's, CIFAR's 32 x 32 RGB arrays as ``PIL.Image``).

    Raises:
        FileNotFoundError: the ImageNet split is missing, or the transfer set is missing and cannot
            be downloaded (``TransferDataError``, one line).
    """
    from data.linear import IMAGENET_DATASETS, build_transfer_sets, canonical_dataset_name  # it imports this module

    name = canonical_dataset_name(config.DATA.DATASET)
    if name in IMAGENET_DATASETS:
        return build_dataset(config, transform, rank, world_size, loader=open_image)
    train_set, _, _ = build_transfer_sets(name, config.DATA.TRANSFER_ROOT, transform, None)
    return train_set


def seeded_loader(config, dataset: Dataset, rank: int, world_size: int) -> DataLoader:
    """The training loader of ``dataset`` on this rank: its shuffled share (``build_sampler``) in
    full batches, each sample augmented with its own seed and an unreadable one replaced (see the
    module docstring). Call ``set_loader_epoch(loader, epoch)`` before each epoch."""
    sampler = build_sampler(config, dataset, rank, world_size)
    generator = torch.Generator()
    generator.manual_seed(derive_seed(config.SEED, 0, rank))
    return make_loader(config, _SeededDataset(dataset), sampler=sampler, drop_last=True, generator=generator)


def set_loader_epoch(data_loader: DataLoader, epoch: int, start_step: int = 0) -> None:
    """Make the next pass over ``data_loader`` the data of ``epoch`` (order and augmentation),
    from its step ``start_step`` on."""
    sampler = data_loader.sampler
    sampler.set_epoch(epoch, start_step * data_loader.batch_size)
    data_loader.generator.manual_seed(derive_seed(sampler.seed, epoch, sampler.rank))
    data_loader.dataset.skipped.value = 0


def skipped_samples(data_loader: DataLoader) -> int:
    """Unreadable images replaced by this process's loader (all its workers) since ``set_loader_epoch``."""
    return data_loader.dataset.skipped.value
