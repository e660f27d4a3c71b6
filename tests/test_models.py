"""Every registered model for gray 28x28 and colour 32x32 input (forward shape, backward, one
optimizer step), resnet18's weights, freezing and learning-rate groups, --init-from, and
`deepfit models` / `deepfit models summary`."""

from __future__ import annotations

import math
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights

from deepfit.checkpoint import load_checkpoint
from deepfit.config import Config, ModelConfig
from deepfit.errors import CheckpointError, ConfigError
from deepfit.models import (
    build_model,
    copy_matching_weights,
    freeze_backbone,
    head_name,
    list_models,
    parameter_groups,
    summarize_model,
)
from deepfit.trained import init_weights

SHAPES = [(1, 28, 28), (3, 32, 32)]


def build(name: str, shape: tuple[int, int, int], num_classes: int = 7, **options: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(name=name, **options), input_shape=shape, num_classes=num_classes)  # type: ignore[arg-type]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("shape", SHAPES, ids=["1x28x28", "3x32x32"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_forwards_backwards_and_steps(name: str, shape: tuple[int, int, int]) -> None:
    model = build(name, shape).train()
    x, y = torch.randn(4, *shape), torch.tensor([0, 1, 2, 6])
    logits = model(x)
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, y).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    with_gradient = [p for p in params if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_gradient) >= len(params) // 2
    before = [p.detach().clone() for p in with_gradient]
    torch.optim.SGD(params, lr=0.1).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, with_gradient, strict=True))
    head = dict(model.named_modules())[head_name(model)]
    assert isinstance(head, nn.Linear) and head.out_features == 7


# The lessons' nets on 1x28x28 and 10 classes, counted by hand:
# cnn3: conv 1*16*25+16 = 416, conv 16*32*25+32 = 12,832, conv 32*64*25+64 = 51,264 (28-4-4 -> pool 10 -> 6 -> pool 3),
#       FC 64*3*3*100+100 = 57,700, FC 100*10+10 = 1,010 -> 123,222 (the lesson's figure)
# cnn3_pad: the same convolutions, 28 -> pool 14 -> pool 7: FC 64*7*7*100+100 = 313,700 -> 379,222
# lenet: conv 1*20*9+20 = 200, conv 20*40*9+40 = 7,240 (28-2 -> pool 13 -> 11 -> pool 5), FC 1000*240+240 = 240,240,
#        240*120+120 = 28,920, 120*84+84 = 10,164, 84*10+10 = 850 -> 287,614
# cifar_cnn on 3x32x32: conv 3*16*25+16 = 1,216 (32-4 -> pool 14), FC 16*14*14*128+128 = 401,536, 128*10+10 = 1,290 -> 404,042
LESSON_PARAMETERS = {
    ("cnn3", (1, 28, 28)): 123_222,
    ("cnn3_pad", (1, 28, 28)): 379_222,
    ("lenet", (1, 28, 28)): 287_614,
    ("cifar_cnn", (3, 32, 32)): 404_042,
}


@pytest.mark.parametrize(("name", "shape"), list(LESSON_PARAMETERS))
def test_lesson_nets_have_the_lessons_parameter_counts(name: str, shape: tuple[int, int, int]) -> None:
    assert sum(p.numel() for p in build(name, shape, 10).parameters()) == LESSON_PARAMETERS[(name, shape)]


def test_cnn3_is_unpadded_and_says_so_on_small_images(cli) -> None:  # type: ignore[no-untyped-def]
    assert all(c.padding == (0, 0) for c in build("cnn3", (1, 28, 28), 10).modules() if isinstance(c, nn.Conv2d))
    with pytest.raises(
        ConfigError, match=r"cannot take 1x8x8 input: .+; train on larger images \(--data.image-size N\) or another --model$"
    ):
        build("cnn3", (1, 8, 8), 10)
    assert build("cnn3_pad", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["airbench", "airbench_whiten_small"])
def test_a_globally_pooled_net_too_deep_for_the_input_is_refused_when_built(name: str) -> None:
    # no flatten size to compute, so only the probe's forward pass finds it (before: mid-training)
    with pytest.raises(ConfigError, match="cannot take 3x8x8 input"):
        build(name, (3, 8, 8), 10)


def test_lesson_models_have_the_lesson_layers() -> None:
    cnn3 = build("cnn3", (1, 28, 28), 10)
    convs = [m for m in cnn3.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(16, (5, 5)), (32, (5, 5)), (64, (5, 5))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn3.modules()) == 2
    assert [m.out_features for m in cnn3.modules() if isinstance(m, nn.Linear)] == [100, 10]
    cifar = build("cifar_cnn", (3, 32, 32), 10)
    (conv,) = [m for m in cifar.modules() if isinstance(m, nn.Conv2d)]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (3, 16, (5, 5))
    linears = [m for m in cifar.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 14 * 14, 128), (128, 10)]


# --- resnet18: weights, channels, freezing, learning-rate groups -------------------------------


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict (1000-class head) with recognisable random weights."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("channels", [1, 3])
def test_resnet18_loads_a_state_dict_file_and_adapts_channels_and_head(resnet_file, channels: int) -> None:  # type: ignore[no-untyped-def]
    path, state = resnet_file
    model = build("resnet18", (channels, 32, 32), 5, weights=str(path))
    own = model.state_dict()
    assert torch.equal(own["layer3.1.conv2.weight"], state["layer3.1.conv2.weight"])
    assert torch.equal(own["bn1.running_var"], state["bn1.running_var"])
    expected_conv1 = state["conv1.weight"] if channels == 3 else state["conv1.weight"].sum(1, keepdim=True)
    assert torch.allclose(own["conv1.weight"], expected_conv1)
    assert own["fc.weight"].shape == (5, 512)
    # a gray image gives the response the RGB filters gave to its three-channel copy
    gray = torch.rand(2, 1, 32, 32)
    rgb_model = build("resnet18", (3, 32, 32), 5, weights=str(path)).eval()
    if channels == 1:
        assert torch.allclose(model.eval().conv1(gray), rgb_model.conv1(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_resnet18_without_weights_is_random_and_refuses_bad_weight_files(tmp_path: Path) -> None:
    a, b = build("resnet18", (3, 32, 32)), build("resnet18", (3, 32, 32), weights="none")
    assert torch.equal(a.state_dict()["layer1.0.conv1.weight"], b.state_dict()["layer1.0.conv1.weight"])
    with pytest.raises(ConfigError, match="no such file"):
        build("resnet18", (3, 32, 32), weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "lenet.pth"
    torch.save(build("lenet", (1, 28, 28)).state_dict(), wrong)
    with pytest.raises(ConfigError, match="not a resnet18 state dict"):
        build("resnet18", (3, 32, 32), weights=str(wrong))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(ConfigError, match="not a readable state dict"):
        build("resnet18", (3, 32, 32), weights=str(junk))


def test_imagenet_weights_without_internet_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(type(ResNet18_Weights.DEFAULT), "get_state_dict", offline)
    with pytest.raises(ConfigError, match=r"imagenet: cannot get .*without internet.*resnet18-f37072fd\.pth"):
        build("resnet18", (3, 32, 32), weights="imagenet")


def test_frozen_backbone_stays_byte_identical_while_the_head_learns() -> None:
    model = build("resnet18", (3, 32, 32), 5)
    freeze_backbone(model)
    groups = parameter_groups(model, lr=0.1, config=ModelConfig(name="resnet18", freeze="backbone"))
    (group,) = groups
    assert {id(p) for p in group["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    before = snapshot(model)
    optimizer = torch.optim.SGD(group["params"], lr=0.1)
    model.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8) % 5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert sorted(moved) == ["fc.bias", "fc.weight"]  # BatchNorm running statistics included
    assert model.training and not model.bn1.training  # fit's model.train() cannot unfreeze BatchNorm
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))


def test_fine_tuning_gives_the_backbone_a_lower_learning_rate(resnet_file) -> None:  # type: ignore[no-untyped-def]
    path, _ = resnet_file
    config = ModelConfig(name="resnet18", weights=str(path), backbone_lr_scale=0.05)
    model = build_model(config, input_shape=(3, 32, 32), num_classes=5)
    head, backbone = parameter_groups(model, lr=0.02, config=config)
    assert (head["name"], head["lr"]) == ("head", 0.02)
    assert backbone["name"] == "backbone" and backbone["lr"] == pytest.approx(0.001)
    assert len(head["params"]) == 2 and len(backbone["params"]) == len(list(model.parameters())) - 2
    scratch = ModelConfig(name="resnet18")  # from scratch: one group, one lr
    (only,) = parameter_groups(model, lr=0.02, config=scratch)
    assert only["lr"] == 0.02 and len(only["params"]) == len(list(model.parameters()))


# --- --init-from --------------------------------------------------------------------------------


def test_copy_matching_weights_copies_name_and_shape_matches_and_lists_the_rest() -> None:
    source = build("mlp", (1, 8, 8), 10, hidden=[64])  # 1: Linear(64, 64), 3: Linear(64, 10)
    target = build("mlp", (1, 8, 8), 10, hidden=[64, 32])  # 1: Linear(64, 64), 3: Linear(64, 32), 5: Linear(32, 10)
    untouched = snapshot(target)
    result = copy_matching_weights(target, source.state_dict())
    assert result.copied == ["1.weight", "1.bias"]
    assert torch.equal(target.state_dict()["1.weight"], source.state_dict()["1.weight"])
    assert torch.equal(target.state_dict()["3.weight"], untouched["3.weight"])
    assert result.skipped == [
        "3.weight: shape (10, 64) in the source, (32, 64) here",
        "3.bias: shape (10,) in the source, (32,) here",
        "5.weight: not in the source",
        "5.bias: not in the source",
    ]


def test_a_head_for_other_classes_starts_fresh(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = train_digits(cli, "first", "--model", "mlp", "--model.hidden", "32")
    digit_names = [str(d) for d in range(10)]
    same = build("mlp", (1, 8, 8), 10, hidden=[32])
    assert init_weights(same, first, classes=digit_names).skipped == []  # same classes: the head is copied too
    other = build("mlp", (1, 8, 8), 10, hidden=[32])
    head_before = other.state_dict()["3.weight"].clone()
    report = init_weights(other, first, classes=[f"letter-{c}" for c in "abcdefghij"])
    assert report.copied == ["1.weight", "1.bias"]
    assert report.skipped == ["3.weight: new head for other classes", "3.bias: new head for other classes"]
    assert torch.equal(other.state_dict()["3.weight"], head_before)


def train_digits(cli, out: str, *args: str) -> Path:  # type: ignore[no-untyped-def]
    result = cli("train", "--data", "digits", "--epochs", "1", "--no-progress", "--out", out, "--data.batch-size", "64", *args)
    assert result.code == 0, result.err
    return Path(out)


def test_init_from_a_run_folder_through_the_cli(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = train_digits(cli, "first", "--model", "mlp", "--model.hidden", "64")
    source = load_checkpoint(first / "checkpoints" / "best.pt")["model"]
    model = build("mlp", (1, 8, 8), 10, hidden=[64, 32])
    report = init_weights(model, first)  # a run folder stands for its best.pt
    assert report.path == first / "checkpoints" / "best.pt"
    assert torch.equal(model.state_dict()["1.weight"], source["1.weight"]) and len(report.skipped) == 4
    result = cli(
        "train", "--data", "digits", "--epochs", "1", "--no-progress", "--out", "second", "--model", "mlp",
        "--model.hidden", "64,32", "--init-from", str(first), "--sched.name", "none", "--optim.lr", "1e-9",
    )  # fmt: skip
    assert result.code == 0, result.err
    assert "copied 2 tensors, 4 did not match" in result.out
    assert "not matched: 3.weight: shape (10, 64) in the source, (32, 64) here" in result.out
    trained = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")["model"]
    assert torch.allclose(trained["1.weight"], source["1.weight"], atol=1e-6)  # lr 1e-9: still the copied values


def test_init_from_nothing_that_matches_is_an_error(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = train_digits(cli, "first", "--model", "mlp", "--model.hidden", "16")
    with pytest.raises(CheckpointError, match="no tensor of it matches"):
        init_weights(build("cnn3_pad", (1, 8, 8), 10), first)
    result = cli("train", "--data", "digits", "--no-progress", "--model", "cnn3_pad", "--init-from", str(tmp_path / "nowhere"))
    assert result.code == 2 and "nowhere" in result.err


# --- deepfit models / models summary ----------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_summary_counts_every_parameter_once(name: str) -> None:
    model = build(name, (3, 32, 32), 7)
    summary = summarize_model(model, (3, 32, 32))
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert sum(row.params for row in summary.rows) == summary.total
    assert summary.output_shape == (7,) and summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.training  # the summary's eval pass leaves the mode as it was


def test_cli_models_lists_and_summarizes(cli) -> None:  # type: ignore[no-untyped-def]
    listing = cli("models")
    assert listing.code == 0
    lines = listing.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_models()
    assert all(len(line.split()) > 3 for line in lines)  # each with a description
    assert all(line.rstrip().endswith((".", ")")) for line in lines), lines  # a whole sentence, not a docstring's first line cut short
    result = cli("models", "summary", "cnn3", "--input", "1x28x28", "--classes", "10")
    assert result.code == 0, result.err
    assert re.search(r"features\.7\s+MaxPool2d\s+64x3x3\s+0", result.out)
    assert "total parameters: 123,222" in result.out
    total = int(re.search(r"total parameters: ([\d,]+)", result.out).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert total == sum(p.numel() for p in build("cnn3", (1, 28, 28), 10).parameters())
    mlp = cli("models", "summary", "mlp", "--input", "3x8x8", "--model.hidden", "20", "--classes", "4")
    assert "total parameters: 3,944" in mlp.out  # 192*20+20 + 20*4+4
    too_small = ["models", "summary", "lenet", "--input", "1x8x8"]  # two unpadded convs and pools need more
    for bad in (["models", "summary", "nosuchnet"], ["models", "summary", "mlp", "--input", "28"], ["models", "summary"], too_small):
        failed = cli(*bad)
        assert failed.code == 2 and failed.err.count("\n") == 1, failed.err


def test_cli_models_name_alone_is_its_summary(cli) -> None:  # type: ignore[no-untyped-def]
    alone = cli("models", "cnn3", "--input", "1x28x28")
    assert alone.code == 0, alone.err
    assert alone.out == cli("models", "summary", "cnn3", "--input", "1x28x28").out
    assert "total parameters: 123,222" in alone.out
    two = cli("models", "cnn3", "lenet")
    assert two.code == 2 and two.err.strip().endswith("models: unknown action 'cnn3'; use list, or summary NAME")


@pytest.mark.parametrize(("task", "names"), [("regression", ["linear", "mlp"]), ("node", ["gcn", "mlp"])])
def test_cli_models_lists_the_other_tasks_models(cli, task: str, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    listing = cli("models", "--task", task)
    assert listing.code == 0, listing.err
    lines = listing.out.strip().splitlines()
    assert [line.split()[0] for line in lines] == names and all(line.rstrip().endswith(".") for line in lines)
    if task == "node":
        pytest.importorskip("torch_geometric", reason="the gcn model is PyTorch Geometric's GCNConv (the graph extra)")
    refused = cli("models", "summary", names[0])  # linear, gcn: no image shape, a feature count is needed
    assert refused.code == 2 and f"{names[0]} is a {task} model: give --input F" in refused.err and refused.err.count("\n") == 1
    summary = cli("models", "summary", names[0], "--input", "12", "--classes", "3")  # the task found from the name alone
    assert summary.code == 0, summary.err
    assert summary.out.startswith(f"{names[0]}: input 12 features")
    expected = 12 + 1 if task == "regression" else 12 * 16 + 16 + 16 * 3 + 3  # linear: 12 weights and a bias; gcn: two GCNConv layers
    assert f"total parameters: {expected:,}" in summary.out
    rows = [line.split() for line in summary.out.splitlines()[3:-1]]
    assert sum(int(row[-1].replace(",", "")) for row in rows) == expected  # every parameter in one row (GCNConv's bias too)
    as_image = cli("models", "summary", "mlp", "--input", "5")  # mlp is an image model too: CxHxW unless told
    assert as_image.code == 2 and "a feature count is for --task regression or --task node" in as_image.err
    mlp = cli("models", "summary", "mlp", "--task", task, "--input", "5", "--model.hidden", "4", "--classes", "3")
    assert (
        mlp.code == 0
        and f"total parameters: {5 * 4 + 4 + 4 * (1 if task == 'regression' else 3) + (1 if task == 'regression' else 3)}" in mlp.out
    )


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resnet18"])
def test_training_memory_estimate_matches_a_real_forward_pass(name: str) -> None:
    """training_bytes builds the model on the meta device; the same sums from a real model's summary."""
    from deepfit.models import training_bytes

    shape = (3, 40, 40)
    config = Config()
    config.model.name = name
    summary = summarize_model(build_model(config.model, input_shape=shape, num_classes=5), shape)
    activations = sum(4 * math.prod(row.output_shape) for row in summary.rows)  # float32 outputs per image
    assert training_bytes(config.model, shape, 5, batch_size=16) == 4 * 4 * summary.total + 16 * activations


def test_training_that_cannot_fit_in_memory_stops_before_the_model_is_built(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: torch.device
) -> None:  # type: ignore[no-untyped-def]
    import deepfit.fitparts

    monkeypatch.setattr(deepfit.fitparts, "device_memory", lambda device: 50 * 2**20)  # a machine of 50 MiB
    built: list[str] = []
    monkeypatch.setattr(deepfit.fitparts, "build_model", lambda *a, **k: built.append("built"))
    args = ["train", "--data", "digits", "--data.image-size", "170", "--epochs", "1", "--no-progress", "--out", "run"]
    result = cli(*args)
    assert result.code == 2 and "cnn_bn on 1x170x170 images in batches of 128 needs about" in result.err
    where = "the GPU has" if device.type == "cuda" else "this machine has"  # the memory of the device it would train on
    assert f"more than the 0.1 GB {where}: lower --data.image-size or --data.batch-size" in result.err
    assert built == [] and not (tmp_path / "run").exists()


def test_a_model_that_cannot_run_on_meta_tensors_gets_no_estimate() -> None:
    from deepfit.models import training_bytes
    from deepfit.models.summary import meta_training_bytes

    config = Config()
    config.model.name = "nosuchnet"
    assert training_bytes(config.model, (3, 40, 40), 5, batch_size=16) is None  # no estimate, so no check and no crash
    with pytest.raises(Exception):  # noqa: B017  the failure training_bytes absorbs
        meta_training_bytes(config.model, (3, 40, 40), 5, batch_size=16)
