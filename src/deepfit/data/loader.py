"""Training batches, two ways with one interface (DESIGN.md section 3): BatchLoader slices an
in-memory uint8 tensor; StreamLoader decodes files in DataLoader workers. Both hand uint8 batches
to BatchPrep, which converts, normalises and augments them per batch on the training device."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from deepfit.data.bundle import ImageSet
from deepfit.data.stream import StreamSet, collate_items, own_generator, raise_failures
from deepfit.errors import DataError

AUGMENT_PRESETS = ("none", "crop", "flip-crop", "random-resized-crop")
TRANSLATING = ("crop", "flip-crop")  # the presets that translate by crop_pad into a pad_mode border
FLIP_MODES = ("random", "alternate")
PAD_MODES = ("constant", "reflect", "replicate")  # torch.nn.functional.pad's modes that crop may fill with
Batch = tuple[torch.Tensor, torch.Tensor]  # x float (B, C, H, W) normalised, y int64 (B,)
FLIP_SEED_OFFSET = 0x5EED  # alternate flips' coins come from seed + this, apart from the order's stream
Share = tuple[Any, int]  # the rows (a slice, or an index tensor) of a global batch one rank holds, and that batch's size


def share_rows(total: int, rank: int, size: int) -> slice:
    """Rank `rank` of `size`'s contiguous rows of `total`: shares differ by at most one row,
    the first `total % size` ranks take the extra one, and together they cover every row once."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class BatchPrep:
    """uint8 (B, C, H, W) -> float on `device`, normalised, augmented by `generator` when asked."""

    def __init__(
        self,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        generator: torch.Generator,
        augment: str = "none",
        channels_last: bool = False,
        crop_pad: int | None = None,
        pad_mode: str = "constant",
        flip_coins: torch.Tensor | None = None,
    ) -> None:
        stats = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # x_norm = (x / 255 - mean) / std = x * scale - shift
        self.scale = 1.0 / (255.0 * stats)
        self.shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) / stats
        self.device = device
        self.generator = generator
        self.augment = augment
        self.channels_last = channels_last
        self.crop_pad = crop_pad  # pixels crop and flip-crop translate by; None: default_crop_pad(side)
        self.pad_mode = pad_mode  # how crop fills the border a translation uncovers
        self.flip_coins = flip_coins  # (N,) bool per image of the split: alternate flips; None: random flips

    def __call__(
        self, batch: torch.Tensor, share: Share | None = None, *, index: torch.Tensor | None = None, epoch: int = 0
    ) -> torch.Tensor:
        """share: `batch` is these rows of a larger global batch; the random draws are made for the
        whole global batch and this share's rows used, so N ranks augment as one process does.
        index, epoch: the batch's rows in the split and the epochs already done (alternate flips)."""
        x = batch.to(self.device, non_blocking=True).float()
        if self.augment in ("flip-crop", "random-resized-crop"):
            x = self.mirror(x, share, index, epoch)
        if self.augment in TRANSLATING:
            pad = self.crop_pad if self.crop_pad is not None else default_crop_pad(x.shape[-1])
            x = random_crop(x, pad=pad, generator=self.generator, share=share, mode=self.pad_mode)
        elif self.augment == "random-resized-crop":
            x = random_resized_crop(x, generator=self.generator, share=share)
        x = x.mul_(self.scale).sub_(self.shift)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def mirror(self, x: torch.Tensor, share: Share | None, index: torch.Tensor | None, epoch: int) -> torch.Tensor:
        if self.flip_coins is None:
            return random_flip(x, self.generator, share)
        if index is None:
            raise ValueError("alternate flips need the batch's image indices")
        return alternate_flip(x, self.flip_coins[index], epoch)


class EpochOrder:
    """The shuffle order of the current epoch and how many of its batches were handed out,
    drawn from a dedicated generator and saved by state_dict() for exact mid-epoch resume."""

    def __init__(
        self, count: int, *, batch_size: int, shuffle: bool, seed: int, order_device: torch.device, drop_last: bool = False
    ) -> None:
        self.count = count
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last  # full batches only: an epoch leaves out the count % batch_size images drawn last
        self.order_device = order_device
        self.generator = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None  # this epoch's permutation, drawn lazily
        self.sample_weights: torch.Tensor | None = None  # (N,) set for data.sampler balanced: draw by weight, with replacement
        self.position = 0  # batches of this epoch already handed out
        self.epochs_done = 0  # epochs handed out to the end (alternate flips mirror by its parity)
        self.shard = (0, 1)  # (rank, world size): each global batch is split by share_rows
        self.rows_this_epoch = 0  # images this rank was handed in the current (or last) epoch
        self.batch_weight = 1.0  # this rank's share of the current global batch (rows / global rows)

    @property
    def batches_per_epoch(self) -> int:
        if self.drop_last:
            return self.count // self.batch_size
        return (self.count + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        """Batches still to come in this epoch (all of them unless resumed mid-epoch)."""
        return self.batches_per_epoch - self.position

    def start_epoch(self) -> torch.Tensor:
        """The order, drawn now unless a resumed or interrupted epoch already has one."""
        if self.order is None:
            self.order = self.draw_order()
            self.rows_this_epoch = 0
        return self.order

    def end_epoch(self) -> None:
        self.order, self.position = None, 0
        self.epochs_done += 1

    def draw_order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.count, device=self.order_device)
        if self.sample_weights is not None:
            return torch.multinomial(self.sample_weights, self.count, replacement=True, generator=self.generator).to(self.order_device)
        return torch.randperm(self.count, generator=self.generator).to(self.order_device)

    def batch_index(self, order: torch.Tensor, position: int) -> torch.Tensor:
        start = position * self.batch_size
        return order[start : start + self.batch_size]

    def batch_share(self, position: int) -> Share:
        """This rank's rows of global batch `position` (all of them in a single process)."""
        total = min(self.batch_size, self.count - position * self.batch_size)
        return share_rows(total, *self.shard), total

    def hand_out(self, share: Share) -> None:
        """Book a batch share as handed out: images counted, its weight kept for the gradient average."""
        rows = len(share[0]) if isinstance(share[0], torch.Tensor) else share[0].stop - share[0].start
        self.position += 1
        self.rows_this_epoch += rows
        self.batch_weight = rows / max(share[1], 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": self.order.cpu() if self.order is not None else None,
            "position": self.position,
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].to(self.order_device) if state["order"] is not None else None
        self.position = int(state["position"])
        self.epochs_done = int(state.get("epochs_done", 0))  # absent before alternate flips existed


class BatchLoader(EpochOrder):
    """Iterates (x, y) batches: x float (B, C, H, W) normalised, y int64 (B,), both on `device`.

    A dedicated generator decides the shuffle order and the augmentation, and `state_dict()`
    records the epoch's order and position, so a run resumed mid-epoch sees the same batches.
    """

    def __init__(
        self,
        data: ImageSet,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        channels_last: bool = False,
        crop_pad: int | None = None,
        pad_mode: str = "constant",
        flip: str = "random",
        drop_last: bool = False,
    ) -> None:
        super().__init__(len(data), batch_size=batch_size, shuffle=shuffle, seed=seed, order_device=device, drop_last=drop_last)
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.device = device
        self.augment = augment
        self.channels_last = channels_last
        self.prepare = BatchPrep(
            mean=mean, std=std, device=device, generator=self.generator, augment=augment, channels_last=channels_last,
            crop_pad=crop_pad, pad_mode=pad_mode, flip_coins=flip_coins(flip, len(data), seed, device),
        )  # fmt: skip

    def __iter__(self) -> Iterator[Batch]:
        order = self.start_epoch()
        while self.position < self.batches_per_epoch:
            share = self.batch_share(self.position)
            index = self.batch_index(order, self.position)[share[0]]
            self.hand_out(share)
            yield self.prepare(self.images[index], share, index=index, epoch=self.epochs_done), self.labels[index]
        self.end_epoch()


class BatchPlan:
    """The DataLoader's batch sampler: index lists of the loader's current epoch from its saved
    position on, so the batches already trained are skipped without being read or decoded. (Held
    weakly by it: no reference cycle, so a finished loader is freed at once.)"""

    def __init__(self, owner: StreamLoader) -> None:
        self.owner = weakref.proxy(owner)

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self) -> Iterator[list[int]]:
        owner = self.owner
        order = owner.start_epoch()
        for position in range(owner.position, owner.batches_per_epoch):
            rows = owner.batch_share(position)[0]
            yield owner.data.index[owner.batch_index(order, position)[rows]].tolist()


class StreamLoader(EpochOrder):
    """BatchLoader's interface over a StreamSet: worker processes read and decode the files of each
    batch (uint8), the main process draws the order and the augmentation from the dedicated
    generator, so the batches equal BatchLoader's on the same pixels and resume exactly."""

    def __init__(
        self,
        data: StreamSet,
        *,
        batch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        channels_last: bool = False,
        crop_pad: int | None = None,
        pad_mode: str = "constant",
        flip: str = "random",
        num_workers: int = 2,
        skip_bad: bool = False,
        drop_last: bool = False,
    ) -> None:
        cpu = torch.device("cpu")
        super().__init__(len(data), batch_size=batch_size, shuffle=shuffle, seed=seed, order_device=cpu, drop_last=drop_last)
        self.data = data
        self.device = device
        self.augment = augment
        self.channels_last = channels_last
        self.skip_bad = skip_bad
        self.prepare = BatchPrep(
            mean=mean, std=std, device=device, generator=self.generator, augment=augment, channels_last=channels_last,
            crop_pad=crop_pad, pad_mode=pad_mode, flip_coins=flip_coins(flip, len(data), seed, cpu),
        )  # fmt: skip
        self.loader = DataLoader(
            data.items, batch_sampler=BatchPlan(self), num_workers=num_workers, collate_fn=collate_items,
            pin_memory=device.type == "cuda", generator=own_generator(),
        )  # fmt: skip

    def __iter__(self) -> Iterator[Batch]:
        order = self.start_epoch()  # before the DataLoader asks BatchPlan for indices
        batches, finished = iter(self.loader), False
        try:
            for images, labels, failures in batches:
                share = self.batch_share(self.position)
                index = self.batch_index(order, self.position)[share[0]]
                keep = raise_failures(failures, len(labels), skip_bad=self.skip_bad)
                if keep is not None:  # skipped files: their random draws are made and left unused
                    images, labels, index = images[keep], labels[keep], index[keep]
                    share = (torch.arange(share[0].start, share[0].stop)[keep], share[1])
                self.hand_out(share)
                if len(labels):
                    yield self.prepare(images, share, index=index, epoch=self.epochs_done), labels.to(self.device, non_blocking=True)
            finished = True
        finally:
            if not finished:
                self.stop_workers(batches)
        self.end_epoch()

    def stop_workers(self, batches: Iterator[Any]) -> None:
        """An epoch left midway (an error, a stop request): end its workers now. Workers still alive
        when the garbage collector frees their DataLoader (an exception's traceback or a plotting
        library easily holds a run in a cycle) stall it 5 s each: the collector closes their queues
        before the DataLoader can send them the stop signal. The same is why workers are not
        persistent: a finished epoch ends its own (forking two again costs ~0.1 s an epoch)."""
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def build_loader(
    data: ImageSet,
    *,
    batch_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    shuffle: bool = False,
    augment: str = "none",
    seed: int = 0,
    channels_last: bool = False,
    crop_pad: int | None = None,
    pad_mode: str = "constant",
    flip: str = "random",
    num_workers: int = 2,
    skip_bad: bool = False,
    drop_last: bool = False,
) -> BatchLoader | StreamLoader:
    """A StreamLoader for a streamed split, a BatchLoader for one in memory (drop_last: full batches only)."""
    for what, value, valid in (
        ("augmentation", augment, AUGMENT_PRESETS),
        ("pad mode", pad_mode, PAD_MODES),
        ("flip mode", flip, FLIP_MODES),
    ):
        if value not in valid:
            raise DataError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
    if augment in TRANSLATING:  # a bad border stops here, before a run folder exists, not at the first batch
        shape = data.images.shape
        require_reflectable(shape, default_crop_pad(shape[-1]) if crop_pad is None else crop_pad, pad_mode)
    common: dict[str, Any] = {"batch_size": batch_size, "mean": mean, "std": std, "device": device}
    common |= {"shuffle": shuffle, "augment": augment, "seed": seed, "channels_last": channels_last, "crop_pad": crop_pad}
    if drop_last and len(data) < batch_size:
        raise DataError(
            f"data.drop_last keeps full batches only, and {len(data)} training images fill none of "
            f"data.batch_size {batch_size}; lower the batch size or turn drop_last off"
        )
    common |= {"pad_mode": pad_mode, "flip": flip, "drop_last": drop_last}
    if isinstance(data, StreamSet):
        return StreamLoader(data, num_workers=num_workers, skip_bad=skip_bad, **common)
    return BatchLoader(data, **common)


def drawn(values: torch.Tensor, share: Share | None) -> torch.Tensor:
    """The rows of per-image random values (drawn for the whole global batch) that `share` holds."""
    return values if share is None else values[share[0]]


def draw_count(x: torch.Tensor, share: Share | None) -> int:
    return x.shape[0] if share is None else share[1]


def random_flip(x: torch.Tensor, generator: torch.Generator, share: Share | None = None) -> torch.Tensor:
    """Mirror a random half of the batch left-right. The draws come from the loader's CPU generator
    (saved for exact resume); non_blocking copies them without waiting for the GPU: a plain .to()
    from pageable memory synchronises the stream, three times a step here."""
    flip = (drawn(torch.rand(draw_count(x, share), generator=generator), share) < 0.5).to(x.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def alternate_flip(x: torch.Tensor, coins: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flip: an image is mirrored in the epochs where its coin differs from
    the epoch's parity, so a random half in the first epoch, then each image the other way round
    in every next one: both views of every image every two epochs, none seen twice running."""
    flip = (coins != bool(epoch % 2)).to(x.device, non_blocking=True)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def flip_coins(flip: str, count: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """One coin per image of the split for alternate flips (None for random ones), drawn from the
    seed alone, so a resumed run redraws the same coins without saving them."""
    if flip != "alternate":
        return None
    generator = torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET)
    return (torch.rand(count, generator=generator) < 0.5).to(device)


def default_crop_pad(side: int) -> int:
    """How far `crop` and `flip-crop` translate: 2 pixels on MNIST-sized (28 px) images, 4 from 32 px up."""
    return 2 if side < 32 else 4


def require_reflectable(shape: torch.Size, pad: int, mode: str) -> None:
    """A reflected border mirrors inner pixels, so it must be narrower than the image."""
    if mode == "reflect" and pad >= min(shape[-2:]):
        raise DataError(f"data.pad_mode reflect needs data.crop_pad below the image side ({min(shape[-2:])} px); got {pad}")


def random_crop(
    x: torch.Tensor, *, pad: int, generator: torch.Generator, share: Share | None = None, mode: str = "constant"
) -> torch.Tensor:
    """Pad by `pad` pixels (constant: zeros, i.e. black; reflect: mirrored inner pixels; replicate:
    the edge repeated), then take a random HxW window per image (a translation)."""
    b, c, h, w = x.shape
    require_reflectable(x.shape, pad, mode)
    n = draw_count(x, share)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = drawn(torch.randint(0, 2 * pad + 1, (n,), generator=generator), share)
    dx = drawn(torch.randint(0, 2 * pad + 1, (n,), generator=generator), share)
    dy, dx = torch.stack((dy, dx)).to(x.device, non_blocking=True)  # one small copy for both (a launch each on a GPU)
    rows = (dy.view(b, 1) + positions(h, x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
    padded = padded.gather(2, rows)  # (B, C, H, W+2p)
    cols = (dx.view(b, 1) + positions(w, x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return padded.gather(3, cols)  # (B, C, H, W)


@functools.cache
def positions(n: int, device: torch.device) -> torch.Tensor:
    """0..n-1 on `device`, made once: random_crop adds them to every batch's offsets."""
    return torch.arange(n, device=device)


def random_resized_crop(
    x: torch.Tensor, *, generator: torch.Generator, scale: tuple[float, float] = (0.35, 1.0), share: Share | None = None
) -> torch.Tensor:
    """Per image, a random square crop of `scale` of the area at a random place, resized back."""
    b, n = x.shape[0], draw_count(x, share)
    side = drawn(torch.empty(n).uniform_(scale[0], scale[1], generator=generator).sqrt(), share)  # (B,) share of side
    cx = (drawn(torch.rand(n, generator=generator), share) * 2 - 1) * (1 - side)
    cy = (drawn(torch.rand(n, generator=generator), share) * 2 - 1) * (1 - side)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = side, side, cx, cy
    grid = torch.nn.functional.affine_grid(theta.to(x.device, non_blocking=True), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
