"""pccfast.export: pruned models of every family that prunes go to ONNX (the dynamo exporter)
and run in onnxruntime with PyTorch's outputs at fp32 accuracy, at a batch other than the
traced one; TorchScript and torch.export files load and agree; what cannot export is named.
Small inputs keep the exporters quick (about 5-15 s a model on 2 cores)."""

import pytest
import torch
from torch import nn

import pccfast
from pccfast.deploy import ExportError, load_onnx_session
from pccfast.prune.graph import build_graph
from cases import randomize_bn
from test_model_families import random_scores


def pruned_model(model, size, round_to=1):
    torch.manual_seed(0)
    model = randomize_bn(model).eval()
    shape = (1, 3, size, size)
    graph = build_graph(model, shape)
    pruned, plan = pccfast.prune(model, random_scores(graph), target_flops=0.5, input_size=shape,
                                 round_to=round_to, verify=False)
    assert plan.removed["flops"] > 0.4
    return pruned.eval()


def assert_fp32_close(got, expected):
    """Two fp32 implementations of the same convolutions: rounding differences only."""
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


def onnx_matches(model, size, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = pccfast.export(model, tmp_path / "m.onnx", (3, size, size))
    session = load_onnx_session(path)
    for batch in (1, 3):  # traced at 2: the batch dimension is dynamic
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == expected.shape
        assert_fp32_close(got, expected)


ZOO = [("vgg16_cifar", dict(width=0.25), 32, 8), ("resnet56_cifar", {}, 32, 1),
       ("resnet50", dict(width=0.25), 64, 8)]


@pytest.mark.parametrize("name, kwargs, size, round_to", ZOO, ids=[z[0] for z in ZOO])
def test_pruned_zoo_models_run_in_onnxruntime(name, kwargs, size, round_to, tmp_path):
    model = pccfast.models.create(name, **kwargs)
    onnx_matches(pruned_model(model, size, round_to), size, tmp_path)


FAMILIES = ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"]


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_torchvision_families_run_in_onnxruntime(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None)
    onnx_matches(pruned_model(model, 32), 32, tmp_path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_torchscript_and_torch_export_files_load_and_agree(fmt, tmp_path):
    model = pruned_model(pccfast.models.resnet_cifar(20, width=0.5), 16)
    path = pccfast.export(model, tmp_path / f"m{pccfast.deploy.SUFFIXES[fmt]}", (3, 16, 16),
                          format=fmt)
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else \
        torch.export.load(str(path)).module()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_leaves_the_model_in_its_mode_and_writes_nothing_on_failure(tmp_path):
    model = pccfast.models.resnet_cifar(8, width=0.25).train()
    pccfast.export(model, tmp_path / "a.pt2", (3, 8, 8), format="exported")
    assert model.training
    with pytest.raises(ExportError):
        pccfast.export(DataDependent(), tmp_path / "b.pt2", (3, 8, 8), format="exported")
    assert not (tmp_path / "b.pt2").exists()


class UsesPCC(nn.Module):
    """A custom op (pccfast's PCC) that ONNX has no translation for."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) + pccfast.pcc(y)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else y.amax((2, 3))


def test_an_op_without_onnx_translation_is_named(tmp_path):
    pytest.importorskip("onnxscript")
    with pytest.raises(ExportError, match=r"cannot export UsesPCC to ONNX at op "
                                          r"pccfast\.pcc_forward.*No ONNX function found"):
        pccfast.export(UsesPCC(), tmp_path / "m.onnx", (3, 8, 8))


@pytest.mark.parametrize("fmt, message", [
    ("exported", "cannot export DataDependent to torch.export: .*data-dependent"),
    ("torchscript", "cannot export DataDependent to TorchScript: TracerWarning: Converting a "
                    "tensor to a Python boolean"),
])
def test_data_dependent_control_flow_is_refused(fmt, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        pccfast.export(DataDependent(), tmp_path / "m", (3, 8, 8), format=fmt)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(format="tflite"), ValueError, "format must be one of"),
    (dict(input_size=(3, -1, 8)), ValueError, "input_size must be one input's shape"),
    (dict(opset=3), ValueError, "opset must be"),
    (dict(model="not a model"), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_arguments_are_named(kwargs, error, message, tmp_path):
    args = dict(model=nn.Conv2d(3, 4, 1), input_size=(3, 8, 8))
    args.update(kwargs)
    with pytest.raises(error, match=message):
        pccfast.export(args.pop("model"), tmp_path / "m.onnx", args.pop("input_size"), **args)


def test_a_folder_as_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        pccfast.export(nn.Conv2d(3, 4, 1), tmp_path, (3, 8, 8), format="exported")
