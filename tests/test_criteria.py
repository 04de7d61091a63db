"""The criteria beside CI (l1, hrank, taylor, random): each against a plain reference on small
inputs, residual streams aggregated as CI's, the same layers as CI, DDP sums, the scores file,
errors, and the CLI's --criterion end to end on the bundled digits."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pccfast
from pccfast import CICollector
from pccfast.models import resnet56_cifar, vgg16_cifar
from pccfast.prune.criteria import channel_rank, taylor_importance
from cases import site_activations, streamed_scores

SIZE = (1, 3, 32, 32)


def site_outputs(model, module_names):
    """Hooks of the tests' own: module name -> its latest output (the tensor in the graph)."""
    acts, handles = {}, []
    for name in module_names:
        handles.append(model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: acts.__setitem__(name, out)))
    return acts, handles


def taylor_reference(model, module_names, images, labels):
    """module name -> (C,) mean over images of |sum_hw a * dL_n/da|, one image at a time."""
    acts, handles = site_outputs(model, module_names)
    total = {}
    try:
        model.eval()
        for n in range(len(images)):
            loss = F.cross_entropy(model(images[n:n + 1]), labels[n:n + 1])
            grads = torch.autograd.grad(loss, [acts[m] for m in module_names])
            for m, g in zip(module_names, grads):
                value = (acts[m].detach() * g).sum((2, 3)).abs()[0].double()
                total[m] = total.get(m, 0) + value
    finally:
        for h in handles:
            h.remove()
    return {m: v / len(images) for m, v in total.items()}


def hrank_reference(model, module_names, images):
    """module name -> (C,) mean over images of numpy's float32 matrix rank of each H x W map."""
    acts = site_activations(model, module_names, images)
    out = {}
    for m in module_names:
        a = acts[m].float().numpy()
        ranks = [[np.linalg.matrix_rank(a[n, c]) for c in range(a.shape[1])] for n in range(len(a))]
        out[m] = torch.tensor(ranks, dtype=torch.float64).mean(0)
    return out


# ------------------------------------------------------------------------------------ l1
def test_l1_is_each_filters_l1_norm_on_cis_layers_without_data():
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)
    scores = pccfast.scores(model, criterion="l1", input_size=SIZE)
    with pccfast.CICollector(model, input_size=SIZE) as col:
        assert list(scores) == col.layer_names  # the same layers as CI
    for name, got in scores.items():
        w = model.get_submodule(name).weight.detach().double()
        expected = torch.tensor([float(w[c].abs().sum()) for c in range(w.shape[0])],
                                dtype=torch.float64)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_l1_of_a_residual_stream_is_the_mean_over_its_convs():
    torch.manual_seed(1)
    model = resnet56_cifar(width=0.25)
    col = pccfast.ScoreCollector(model, "l1", input_size=SIZE)
    stream = ["conv1"] + [f"layer1.{i}.conv2" for i in range(9)]
    assert col.convs["layer1"] == stream
    norms = [model.get_submodule(c).weight.detach().double().abs().sum((1, 2, 3)) for c in stream]
    scores = col.scores()
    torch.testing.assert_close(scores["layer1"], torch.stack(norms).mean(0), rtol=1e-12, atol=0)
    assert not torch.allclose(scores["layer1"], norms[0])  # all convs count, not the first
    inner = model.layer2[3].conv1.weight.detach().double().abs().sum((1, 2, 3))
    torch.testing.assert_close(scores["layer2.3.conv1"], inner, rtol=1e-12, atol=0)
    # the same layer names as CI's, and update() reads no images
    assert col.update(torch.randn(2, 3, 32, 32)) == 0 and col.images == 0
    assert list(scores) == list(pccfast.CICollector(model, input_size=SIZE).groups)


# --------------------------------------------------------------------------------- hrank
def test_channel_rank_of_maps_with_known_rank():
    torch.manual_seed(2)
    ranks = [0, 1, 3, 5, 2]
    maps = torch.zeros(2, len(ranks), 6, 5)
    for n in range(2):
        for c, r in enumerate(ranks):
            for _ in range(r):
                maps[n, c] += torch.outer(torch.randn(6), torch.randn(5))
    maps[1, 4] *= 1e-6  # the tolerance is relative to each map's largest singular value
    got = channel_rank(maps)
    assert got.dtype == torch.float64
    assert got.tolist() == [[float(r) for r in ranks]] * 2


def test_hrank_is_the_mean_rank_and_streams_average_like_ci():
    torch.manual_seed(3)
    model = resnet56_cifar(width=0.25)
    images = torch.randn(3, 3, 32, 32)
    scores, groups = streamed_scores(model, "hrank", images, SIZE)
    stream = groups["layer1"]
    expected = hrank_reference(model, stream + ["layer3.2.relu1"], images)
    torch.testing.assert_close(scores["layer1"],
                               torch.stack([expected[s] for s in stream]).mean(0))
    torch.testing.assert_close(scores["layer3.2.conv1"], expected["layer3.2.relu1"])
    assert 1 < float(scores["layer1"].min()) and float(scores["layer1"].max()) <= 32


# -------------------------------------------------------------------------------- taylor
@pytest.fixture(scope="module")
def vgg64():
    torch.manual_seed(4)
    model = vgg16_cifar(width=0.125).double()
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([3, 1, 4, 1])
    return model, images, labels


def _close_taylor(got, expected):
    # float64 both ways, other summation orders and batch shapes: 1e-8 of the layer's scale
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * float(expected.max()))


def test_taylor_equals_per_image_autograd(vgg64):
    model, images, labels = vgg64
    model.train()
    col = pccfast.ScoreCollector(model, "taylor")
    assert col.update(images[:3], labels[:3]) == 3 and col.update(images[3:], labels[3:]) == 1
    scores = col.scores()
    assert model.training and all(p.grad is None for p in model.parameters())
    sites = {layer: s[0] for layer, s in col.groups.items()}
    expected = taylor_reference(model, list(sites.values()), images, labels)
    for layer, site in sites.items():
        assert float(expected[site].max()) > 0
        _close_taylor(scores[layer], expected[site])
    col.remove()


def test_taylor_of_a_residual_stream_is_the_mean_over_its_sites():
    torch.manual_seed(5)
    model = resnet56_cifar(width=0.25).double()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([7, 2])
    scores = pccfast.scores(model, [(images, labels)], criterion="taylor")
    stream = ["relu"] + [f"layer1.{i}.relu2" for i in range(9)]
    expected = taylor_reference(model, stream + ["layer2.3.relu1"], images, labels)
    _close_taylor(scores["layer1"], torch.stack([expected[s] for s in stream]).mean(0))
    _close_taylor(scores["layer2.3.conv1"], expected["layer2.3.relu1"])


class _TwoConvs(nn.Module):
    def __init__(self, functional: bool, inplace: bool = False):
        super().__init__()
        self.functional, self.inplace = functional, inplace
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        if self.functional:
            x = F.relu(self.bn1(self.conv1(x)), inplace=self.inplace)
            x = F.relu(self.bn2(self.conv2(x)), inplace=self.inplace)
        else:
            x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("inplace", [False, True])
def test_taylor_through_a_functional_relu(inplace):
    """The site hooks the BN before F.relu: activation x gradient must still be the ReLU
    output's (the reference: the same weights with ReLU modules)."""
    torch.manual_seed(6)
    reference = _TwoConvs(functional=False).double()
    for bn in (reference.bn1, reference.bn2):
        bn.running_mean.normal_()  # some channels mostly negative before the ReLU
    model = _TwoConvs(functional=True, inplace=inplace).double()
    model.load_state_dict(reference.state_dict())
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 2])
    col = pccfast.ScoreCollector(model, "taylor")
    col.update(images, labels)
    assert [s.apply_relu for s in col.sites] == [True, True]
    expected = taylor_reference(reference, ["relu1", "relu2"], images, labels)
    scores = col.scores()
    _close_taylor(scores["conv1"], expected["relu1"])
    _close_taylor(scores["conv2"], expected["relu2"])
    col.remove()


def test_taylor_importance_is_abs_of_the_spatial_sum():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    g = torch.tensor([[[[1.0, -1.0], [0.5, 9.0]], [[-1.0, -2.0], [0.0, 0.0]]]])
    assert taylor_importance(a, g).tolist() == [[0.5, 3.0]]


# -------------------------------------------------------------------------------- random
def test_random_is_seeded_uniform_and_independent_of_the_data():
    model = vgg16_cifar(width=0.125)
    a = pccfast.ScoreCollector(model, "random", seed=7)
    assert a.update(torch.randn(2, 3, 32, 32)) == 0
    b = pccfast.ScoreCollector(model, "random", seed=7, input_size=SIZE)
    b.update(torch.rand(5, 3, 32, 32) * 100)
    other = pccfast.scores(model, criterion="random", seed=8, input_size=SIZE)
    subset = pccfast.ScoreCollector(model, "random", seed=7, layers=["features.conv4"],
                                    input_size=SIZE).scores()
    sa, sb = a.scores(), b.scores()
    assert list(sa) == a.layer_names
    for layer, s in sa.items():
        assert s.dtype == torch.float64 and s.numel() == a.widths[layer]
        assert torch.equal(s, sb[layer]) and not torch.equal(s, other[layer])
        assert 0 <= float(s.min()) and float(s.max()) < 1 and len(set(s.tolist())) == s.numel()
    assert torch.equal(subset["features.conv4"], sa["features.conv4"])
    assert not torch.equal(sa["features.conv0"], sa["features.conv1"][:len(sa["features.conv0"])])
    values = torch.cat(list(sa.values()))
    assert abs(float(values.mean()) - 0.5) < 4 * (1 / 12 / len(values)) ** 0.5  # uniform: 4 sigma


# ------------------------------------------------------------------ shared plans, file, DDP
def test_plans_and_surgery_take_any_criterion(tmp_path):
    torch.manual_seed(8)
    model = vgg16_cifar(width=0.125)
    col = pccfast.ScoreCollector(model, "l1", input_size=SIZE)
    scores = col.scores()
    pruned, plan = pccfast.prune(model, scores, rates=0.5)
    layer = plan.layers[0]
    top = torch.argsort(-scores[layer.name], stable=True)[:layer.width_after]
    assert layer.kept_indices == sorted(top.tolist())
    col.save(tmp_path / "l1.pt")
    payload = torch.load(tmp_path / "l1.pt", weights_only=True)
    assert payload["meta"]["criterion"] == "l1" and payload["meta"]["images"] == 0
    loaded = pccfast.ScoreCollector.load_scores(tmp_path / "l1.pt")
    assert all(torch.equal(loaded[k], scores[k]) for k in scores)


def test_errors_name_the_argument():
    model = vgg16_cifar(width=0.125)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="criterion must be one of"):
        pccfast.ScoreCollector(model, "snip")
    col = pccfast.ScoreCollector(model, "taylor")
    with pytest.raises(ValueError, match="needs labels"):
        col.update(x)
    with pytest.raises(ValueError, match="labels must be an"):
        col.update(x, torch.zeros(2))
    col.remove()
    with pytest.raises(ValueError, match="needs a loader"):
        pccfast.scores(model, criterion="hrank")
    with pytest.raises(ValueError, match="needs a loader"):
        pccfast.scores(model, criterion="l1")
    with pytest.raises(RuntimeError, match="input_size"):
        pccfast.ScoreCollector(model, "l1").scores()
    with pytest.raises(ValueError, match="scores no activations"):
        pccfast.ScoreCollector(model, "random", input_size=SIZE).site_scores()
    with pytest.raises(RuntimeError, match="no hrank scores yet"):
        pccfast.ScoreCollector(model, "hrank", input_size=SIZE).scores()
    with pytest.raises(TypeError, match="seed"):
        pccfast.ScoreCollector(model, "random", seed=1.5)

    class Features(nn.Module):  # returns a feature map, not logits
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv(x))

    col = pccfast.ScoreCollector(Features(), "taylor")
    with pytest.raises(TypeError, match="pass loss_fn"):
        col.update(x, torch.zeros(2, dtype=torch.long))
    col.remove()
    custom = pccfast.scores(Features(), [(x, None)], criterion="taylor",
                            loss_fn=lambda out, _: out.sum())
    assert custom["conv"].shape == (4,) and float(custom["conv"].max()) > 0


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = resnet56_cifar(width=0.25).double()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    labels = torch.arange(8) % 10
    out = {}
    for criterion in ("taylor", "hrank"):
        col = pccfast.ScoreCollector(model, criterion, max_images=4)  # 2 per rank
        col.update(images[rank * 4: rank * 4 + 4], labels[rank * 4: rank * 4 + 4])
        out[criterion] = col.scores()
        col.remove()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_sums_are_all_reduced(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = resnet56_cifar(width=0.25).double()
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    labels = torch.arange(8) % 10
    both = [0, 1, 4, 5]  # each rank's first two
    for criterion in ("taylor", "hrank"):
        expected = pccfast.scores(model, [(images[both], labels[both])], criterion=criterion)
        for rank in range(2):
            got = torch.load(tmp_path / f"rank{rank}.pt")[criterion]
            for k in expected:
                torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["l1", "hrank", "taylor"])
def test_cuda_matches_cpu(criterion, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 convs on both sides
    torch.manual_seed(9)
    model = vgg16_cifar(width=0.125)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    cpu = pccfast.scores(model, [(images, labels)], criterion=criterion)
    gpu = pccfast.scores(copy.deepcopy(model).cuda(), [(images.cuda(), labels.cuda())],
                         criterion=criterion)
    for k, expected in cpu.items():
        assert gpu[k].device.type == "cpu" and gpu[k].dtype == torch.float64
        if criterion == "hrank":  # a map's rank may flip by one at the tolerance: 1 of 8 images
            assert float((gpu[k] - expected).abs().max()) <= 1 / 8 + 1e-12, k
        else:
            torch.testing.assert_close(gpu[k], expected, rtol=1e-4,
                                       atol=1e-6 * float(expected.max()))


# ----------------------------------------------------------------------------------- CLI
def test_cli_criterion_end_to_end_on_digits(tmp_path, capsys):
    from pccfast.cli import main
    from pccfast.pipeline.config import RunConfig

    out = tmp_path / "run"
    flags = ["--data", "digits", "--train-limit", "256", "--test-limit", "64", "--model",
             "vgg16_cifar", "--width", "0.125", "--epochs", "1", "--finetune-epochs", "1",
             "--target-flops", "0.3", "--calib-images", "32", "--no-progress"]
    assert main(["run", *flags, "--criterion", "l1", "--out", str(out)]) == 0
    assert "scores    l1:" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score_criterion"] == "l1" and summary["score_images"] == 0
    assert json.loads((out / "plan.json").read_text())["criterion"] == "l1"
    assert "- l1 scores:" in (out / "report.md").read_text()
    from pccfast.pipeline.steps import read_scores

    saved, meta = read_scores(out / "scores.pt")  # the one score-file format
    pretrained = pccfast.load(out / "pretrained.pt")
    l1 = pccfast.scores(pretrained, criterion="l1", input_size=SIZE)
    assert meta["criterion"] == "l1" and saved.keys() == l1.keys()
    assert all(torch.equal(saved[k], l1[k]) for k in l1)  # l1, not CI, was computed
    assert CICollector.load_scores(out / "scores.pt").keys() == l1.keys()

    # a stage command: taylor over the calibration images (labels come with the batches)
    assert main(["ci", "--out", str(out), "--criterion", "taylor", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["score_criterion"] == "taylor" and summary["score_images"] == 32
    # the next stage inherits the folder's criterion; another one is a one-line error
    assert main(["prune", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "plan.json").read_text())["criterion"] == "taylor"
    assert "taylor scores, target flops 0.3" in capsys.readouterr().out
    assert main(["prune", "--out", str(out), "--criterion", "hrank", "--no-progress"]) == 2
    err = capsys.readouterr().err  # the run folder's own check: the scores' settings differ
    assert "scores.pt was made with other settings" in err
    assert 'ci.criterion="taylor" (now "hrank")' in err

    with pytest.raises(ValueError, match="ci.criterion must be one of"):
        RunConfig.from_dict({"ci": {"criterion": "snip"}})
    with pytest.raises(SystemExit) as exc:
        main(["run", "--out", str(out), "--criterion", "snip"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["ci", "--help"])
    assert "--criterion" in capsys.readouterr().out
