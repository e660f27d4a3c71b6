"""The streaming pipeline: decoded per item in DataLoader workers, it gives the batches the
in-memory pipeline gives on the same pixels; `auto` picks it by the memory budget; a resumed epoch
skips the batches already trained without decoding them; a user's own Dataset trains either way."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

import deepfit
from deepfit.config import Config, DataConfig, set_value
from deepfit.data import BatchLoader, ImageSet, StreamLoader, StreamSet, build_data, build_loader, load_images
from deepfit.data.stream import TensorItems, estimate_folder_bytes, stream_set
from deepfit.errors import DataError

CPU = torch.device("cpu")


def write_folder(root: Path, *, per_class: int = 12, classes: int = 3, size: tuple[int, int] = (10, 12), seed: int = 0) -> Path:
    """Class folders of random RGB images, PNG and JPEG alternating, one grey image and one of
    another size (resized to the most common size by both pipelines)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class {c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[0] + 6, size[1] + 2, 3) if (c, i) == (0, 1) else (*size, 3)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            if (c, i) == (1, 2):
                image = image.convert("L")
            image.save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}", quality=90)
    return root


def zip_folder(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            archive.write(file, f"photos/{file.relative_to(folder).as_posix()}")
    return path


def data_config(source: Path, **overrides: Any) -> DataConfig:
    config = DataConfig(name=str(source), cache=False, val_fraction=0.2)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def epoch_batches(loader: BatchLoader | StreamLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize(
    ("augment", "flip", "pad_mode"),
    [("none", "random", "constant"), ("flip-crop", "random", "constant"), ("flip-crop", "alternate", "reflect")],
)
def test_stream_batches_equal_memory_batches(tmp_path: Path, augment: str, flip: str, pad_mode: str) -> None:
    folder = write_folder(tmp_path / "photos")
    memory = build_data(data_config(folder, pipeline="memory"), seed=5)
    stream = build_data(data_config(folder, pipeline="stream"), seed=5)
    assert isinstance(stream.train, StreamSet) and not isinstance(memory.train, StreamSet)
    assert (stream.mean, stream.std, stream.classes, stream.input_shape) == (memory.mean, memory.std, memory.classes, memory.input_shape)
    assert isinstance(stream.val, ImageSet) and torch.equal(stream.val.images, memory.val.images)  # type: ignore[union-attr]
    options: dict[str, Any] = {"batch_size": 8, "mean": memory.mean, "std": memory.std, "device": CPU, "shuffle": True, "seed": 3}
    options |= {"augment": augment, "flip": flip, "pad_mode": pad_mode}
    ours = build_loader(stream.train, num_workers=2, **options)
    theirs = build_loader(memory.train, **options)
    assert isinstance(ours, StreamLoader) and isinstance(theirs, BatchLoader)
    for _ in range(2):  # two epochs: the second order is drawn after the first epoch's augmentation
        got, want = epoch_batches(ours), epoch_batches(theirs)
        assert len(got) == len(want) == theirs.batches_per_epoch
        for (x, y), (x_want, y_want) in zip(got, want, strict=True):
            assert torch.equal(y, y_want) and torch.equal(x, x_want)
    if augment == "none":  # every training image exactly once per epoch, as a multiset
        seen = torch.cat([x for x, _ in got]).flatten(1)
        expected = theirs.prepare(memory.train.images).flatten(1)
        assert torch.equal(sorted_rows(seen), sorted_rows(expected))


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    keys = [hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in rows]
    return rows[sorted(range(len(keys)), key=keys.__getitem__)]


@pytest.mark.parametrize("archive", [False, True])
def test_auto_streams_when_the_decoded_size_exceeds_the_budget(tmp_path: Path, archive: bool) -> None:
    folder = write_folder(tmp_path / "big", per_class=40, size=(64, 64))  # 120 x 3 x 64 x 64 = 1.41 MiB decoded
    source = zip_folder(folder, tmp_path / "big.zip") if archive else folder
    assert estimate_folder_bytes(source, data_config(source)) == 120 * 3 * 64 * 64
    assert estimate_folder_bytes(source, data_config(source, image_size=32, channels=1)) == 120 * 32 * 32
    chosen = {}
    for pipeline, budget in (("auto", 1), ("auto", 2), ("memory", 0), ("stream", 100)):
        bundle = build_data(data_config(source, pipeline=pipeline, memory_budget_mb=budget))
        chosen[pipeline, budget] = type(bundle.train).__name__
        assert bundle.input_shape == (3, 64, 64) and len(bundle.train) == 96
    assert chosen == {("auto", 1): "StreamSet", ("auto", 2): "ImageSet", ("memory", 0): "ImageSet", ("stream", 100): "StreamSet"}


def test_the_zip_streams_the_same_pixels_as_the_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "photos")
    from_folder = build_data(data_config(folder, pipeline="memory"))
    from_zip = build_data(data_config(zip_folder(folder, tmp_path / "photos.zip"), pipeline="stream", num_workers=0))
    options: dict[str, Any] = {"batch_size": 64, "mean": from_folder.mean, "std": from_folder.std, "device": CPU}
    (x, y), (x_zip, y_zip) = next(iter(build_loader(from_folder.train, **options))), next(iter(build_loader(from_zip.train, **options)))
    assert torch.equal(x, x_zip) and torch.equal(y, y_zip)


class CountingItems(TensorItems):
    """Counts the items decoded (in this process: the loader runs without workers here)."""

    decoded = 0

    def __getitem__(self, i: int) -> Any:
        CountingItems.decoded += 1
        return super().__getitem__(i)


def test_a_resumed_epoch_skips_trained_batches_without_decoding_them() -> None:
    images = ImageSet(torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8), torch.arange(50) % 5)
    options: dict[str, Any] = {"batch_size": 8, "mean": (0.5,), "std": (0.25,), "device": CPU, "shuffle": True, "seed": 9}
    first = StreamLoader(stream_set(CountingItems(images), images.labels, (1, 4, 4)), num_workers=0, **options)
    batches = iter(first)
    trained = [next(batches) for _ in range(3)]
    state = first.state_dict()
    rest = [(x.clone(), y.clone()) for x, y in batches]
    CountingItems.decoded = 0
    resumed = StreamLoader(stream_set(CountingItems(images), images.labels, (1, 4, 4)), num_workers=0, **options)
    resumed.load_state_dict(state)
    assert len(resumed) == 4
    again = list(resumed)
    assert CountingItems.decoded == 50 - 3 * 8  # only the 26 images of the 4 batches still to come
    assert len(trained) + len(again) == 7
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(rest, again, strict=True))


def test_a_file_that_fails_while_streaming_stops_the_epoch_or_is_skipped(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "photos")
    broken = folder / "class 2" / "000.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # the header is intact, the pixels are cut off
    options: dict[str, Any] = {"batch_size": 64, "mean": (0.5,) * 3, "std": (0.25,) * 3, "device": CPU}
    with pytest.raises(DataError, match=r"000\.jpg: corrupt or truncated"):  # the stats sample meets it
        build_data(data_config(folder, pipeline="stream", val_fraction=0.0))
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        bundle = build_data(data_config(folder, pipeline="stream", val_fraction=0.0, skip_bad=True))
    with pytest.raises(DataError, match=r"000\.jpg: corrupt or truncated"):
        list(build_loader(bundle.train, num_workers=2, **options))
    with pytest.warns(UserWarning, match="skipped 1 bad image"):
        (x, y), *_ = list(build_loader(bundle.train, num_workers=2, skip_bad=True, **options))
    assert len(x) == len(y) == len(bundle.train) - 1


def test_files_that_are_not_images_are_listed_before_streaming_starts(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "photos")
    (folder / "class 1" / "notes.png").write_text("not a picture")
    with pytest.raises(DataError, match=r"(?s)1 bad file.*notes\.png"):
        build_data(data_config(folder, pipeline="stream"))
    bundle = build_data(data_config(folder, pipeline="stream", skip_bad=True))
    assert [Path(p).name for p, _ in bundle.skipped] == ["notes.png"] and len(bundle.train) + len(bundle.val) == 36  # type: ignore[arg-type]


class Pictures(Dataset[tuple[Any, Any]]):
    """A user's own Dataset: float (C, H, W) tensors in 0..1, PIL images or uint8 tensors."""

    def __init__(self, kind: str, count: int = 60, labels: list[Any] | None = None) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = labels if labels is not None else [i % 3 for i in range(count)]
        self.pixels = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=generator)
        for i, label in enumerate(self.labels):  # learnable: the class brightens one row band
            self.pixels[i, :, 2 * (hash(str(label)) % 3)] = 255
        self.kind = kind

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if self.kind == "float":
            return self.pixels[i].float() / 255, torch.tensor(self.labels[i])
        if self.kind == "pil":
            return Image.fromarray(self.pixels[i].permute(1, 2, 0).numpy()), self.labels[i]
        if self.kind == "numpy":  # (H, W, C) uint8, as OpenCV or np.asarray(pil) give
            return self.pixels[i].permute(1, 2, 0).numpy(), self.labels[i]
        return self.pixels[i], self.labels[i]


class NamedPictures(Pictures):
    classes: ClassVar[list[str]] = ["cat", "dog", "bird"]


def fit_config(tmp_path: Path, name: str, **overrides: str) -> Config:
    config = Config()
    values = {"model.name": "mlp", "model.hidden": "16", "data.batch-size": "8", "data.val-fraction": "0.2", "train.epochs": "2"}
    values |= {"train.progress": "false", "train.out": str(tmp_path / name), "train.seed": "1", **overrides}
    for key, value in values.items():
        set_value(config, key, value)
    return config


def weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["float", "pil", "uint8", "numpy"])
def test_fit_takes_a_users_dataset_in_memory_or_streamed_with_the_same_result(tmp_path: Path, kind: str) -> None:
    dataset = Pictures(kind)
    memory = deepfit.fit(fit_config(tmp_path, "memory"), data=dataset)
    streamed = deepfit.fit(fit_config(tmp_path, "stream", **{"data.memory-budget-mb": "0"}), data=dataset)
    assert isinstance(streamed.data.train, StreamSet) and not isinstance(memory.data.train, StreamSet)
    assert memory.data.classes == ["0", "1", "2"] and memory.data.input_shape == (3, 8, 8)
    stored = torch.cat([memory.data.train.images, memory.data.val.images])  # type: ignore[union-attr]
    assert sorted(map(bytes, stored.flatten(1).numpy())) == sorted(map(bytes, dataset.pixels.flatten(1).numpy()))  # no pixel lost
    assert weights_digest(memory.model) == weights_digest(streamed.model)
    assert "name: tests.test_stream:Pictures" in (tmp_path / "memory" / "config.yaml").read_text()  # not the default source's name


def test_a_run_on_a_users_dataset_records_its_class_and_says_to_give_data(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """It recorded the bare class name, and evaluate then said: unknown dataset 'Pictures'."""
    config = fit_config(tmp_path, "run")
    config.train.out = None  # the folder is named after the class, not its module
    result = deepfit.fit(config, data=Pictures("uint8"))
    assert result.run_dir.name.startswith("Pictures-")
    for args in (["evaluate", str(result.run_dir)], ["show", "predictions", str(result.run_dir)]):
        said = cli(*args)
        assert said.code == 2 and said.err.strip() == (
            "deepfit: error: this run trained on your own Dataset tests.test_stream:Pictures, which deepfit does not"
            " rebuild from its name: give --data PATH (a folder, .zip or .csv of images of the run's classes)"
        )


def test_a_users_dataset_names_its_classes_or_they_come_from_the_labels(tmp_path: Path) -> None:
    named = build_data(DataConfig(), dataset=NamedPictures("uint8"))
    assert named.classes == ["cat", "dog", "bird"] and named.source == "NamedPictures"
    words = ["zebra", "ant", "moth"] * 20
    inferred = build_data(DataConfig(pipeline="stream", num_workers=0), dataset=Pictures("pil", labels=words))
    assert inferred.classes == ["ant", "moth", "zebra"]
    assert torch.equal(inferred.train.labels, torch.tensor([["ant", "moth", "zebra"].index(w) for w in words])[inferred.train.index])  # type: ignore[attr-defined]


def test_a_users_dataset_of_mixed_sizes_trains_at_its_most_common_size() -> None:
    """The first item is the odd one out: the size comes from items spread over the dataset, as a
    folder's most common size; data.image_size still decides when set."""

    class Mixed(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            image = Image.fromarray(self.pixels[i].permute(1, 2, 0).numpy())
            return (image.resize((12, 6)) if i % 4 == 0 else image), self.labels[i]  # a quarter 6x12 (HxW), item 0 among them

    assert build_data(DataConfig(), dataset=Mixed("pil")).input_shape == (3, 8, 8)
    assert build_data(DataConfig(image_size=10), dataset=Mixed("pil")).input_shape == (3, 10, 10)
    assert build_data(DataConfig(val_fraction=0), dataset=Mixed("pil", count=1)).input_shape == (3, 6, 12)  # one item: its own size


def test_numpy_images_grey_or_float_read_as_their_tensor_twins() -> None:
    class Grey(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return self.pixels[i, 0].numpy().astype(np.float32) / 255, self.labels[i]  # (H, W) floats in 0..1

    grey = build_data(DataConfig(val_fraction=0), dataset=Grey("x"))
    assert grey.input_shape == (1, 8, 8)
    assert sorted(map(bytes, grey.train.images.flatten(1).numpy())) == sorted(map(bytes, Grey("x").pixels[:, 0].flatten(1).numpy()))

    class Strange(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return np.zeros((8, 8, 5), np.uint8), self.labels[i]

    with pytest.raises(DataError, match=r"numpy images must be \(H, W\) or \(H, W, C\) with 1, 3 or 4 channels; got shape \(8, 8, 5\)"):
        build_data(DataConfig(), dataset=Strange("x"))


@pytest.mark.parametrize("pipeline", ["memory", "stream"])
def test_a_dataset_item_that_is_not_an_image_and_a_class_is_named(pipeline: str) -> None:
    class OneHot(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return self.pixels[i], torch.nn.functional.one_hot(torch.tensor(self.labels[i]), 3)

    class Missing(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return (None if i == 4 else self.pixels[i]), self.labels[i]

    config = DataConfig(pipeline=pipeline, num_workers=0)
    with pytest.raises(DataError, match=r"item 0 of the dataset has a Tensor of 3 values as its label; .* label\.argmax\(\)"):
        build_data(config, dataset=OneHot("x"))
    with pytest.raises(DataError, match=r"item 4 of the dataset: images must be PIL images, .* not NoneType"):
        build_data(config, dataset=Missing("x", count=20))


def test_a_datasets_16_bit_pil_images_are_read_by_their_top_byte() -> None:
    """PIL's convert('L') clipped 16-bit grey at 255: every scan came out white."""

    class Scans(Dataset[Any]):
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[Any, int]:
            pixels = np.full((6, 6), 1000 + 20000 * i, dtype=np.uint16)  # as OpenCV's IMREAD_UNCHANGED gives
            return (Image.fromarray(pixels) if self.kind == "pil" else pixels), i % 2

    for kind in ("pil", "numpy"):  # numpy: refused as 'integer image tensors must hold pixels in 0..255'
        bundle = build_data(DataConfig(val_fraction=0, num_workers=0), dataset=Scans(kind))
        assert bundle.input_shape == (1, 6, 6)
        assert sorted(int(image.max()) for image in bundle.train.images) == [(1000 + 20000 * i) >> 8 for i in range(4)]


def test_a_workers_data_error_is_its_own_line_and_leaves_no_worker_behind() -> None:
    """Enough items for worker processes: the bad label's DataError comes back as its message, not
    torch's 'Caught DataError in DataLoader worker' traceback, and the broken pass's workers are
    stopped at once (left to the garbage collector, a later load's forked worker could collect
    their iterator and print torch's 'can only test a child process')."""
    import multiprocessing

    class Tiny(Dataset[tuple[Any, Any]]):
        def __init__(self, bad: int) -> None:
            self.bad = bad

        def __len__(self) -> int:
            return 1100

        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return torch.zeros(1, 4, 4, dtype=torch.uint8), (torch.tensor([0, 1]) if i == self.bad else i % 2)

    config = DataConfig(num_workers=2, val_fraction=0)
    with pytest.raises(DataError) as caught:
        build_data(config, dataset=Tiny(1050))
    assert str(caught.value).startswith("item 1050 of the dataset has a Tensor of 2 values as its label")
    assert multiprocessing.active_children() == []  # the error (still held here) keeps no worker alive
    assert len(build_data(config, dataset=Tiny(-1)).train) == 1100


def test_a_normalised_float_dataset_is_refused_with_the_reason(tmp_path: Path) -> None:
    class Normalised(Pictures):
        def __getitem__(self, i: int) -> tuple[Any, Any]:
            return (self.pixels[i].float() / 255 - 0.5) / 0.25, self.labels[i]

    with pytest.raises(DataError, match=r"0\.\.1.*normalises"):
        build_data(DataConfig(), dataset=Normalised("float"))


@pytest.mark.parametrize("content", [b"", b"PK\x05\x06 not really a zip", b"\x00" * 100])
def test_a_broken_zip_gets_the_in_memory_paths_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(content)
    assert estimate_folder_bytes(path, data_config(path)) == 0
    with pytest.raises(DataError, match=r"broken\.zip"):
        build_data(data_config(path))


def test_load_images_decodes_a_few_streamed_samples(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "photos")
    memory = build_data(data_config(folder, pipeline="memory", val_fraction=0.0))
    stream = build_data(data_config(folder, pipeline="stream", val_fraction=0.0))
    pick = torch.tensor([5, 0, 33])
    assert load_images(memory.train) is memory.train
    sample = load_images(stream.train.subset(pick))
    assert not isinstance(sample, StreamSet) and torch.equal(sample.images, memory.train.images[pick])


def test_commands_that_read_pixels_work_on_a_streamed_run(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    folder = write_folder(tmp_path / "photos")
    stream = ["--data.pipeline", "stream", "--data.num-workers", "0"]
    shown = cli("data", "show", str(folder), *stream, "--out", "grid.png", "--count", "6")
    assert shown.code == 0, shown.err
    assert (tmp_path / "grid.png").is_file()
    trained = cli("train", "--data", str(folder), *stream, "--model", "mlp", "--epochs", "1", "--out", "run", "--no-progress")
    assert trained.code == 0, trained.err
    assert cli("show", "samples", "run").code == 0
    evaluated = cli("evaluate", "run", "--split", "all")
    assert evaluated.code == 0, evaluated.err
    assert "36 images" in evaluated.out
