"""CICollector: the scored sites (CHIP's), streamed CI equal to a direct computation, the image
cap, residual-stream scores, DDP reduction, progress loop and the scores file."""

import os

import pytest
import torch

import pccfast
from pccfast.models import resnet50, resnet56_cifar, vgg16_cifar

from cases import assert_within, ci_tolerance, site_activations

CHIP_VGG_SITES = ["features.relu0", "features.pool2", "features.relu3", "features.pool5",
                  "features.relu6", "features.relu7", "features.pool9", "features.relu10",
                  "features.relu11", "features.pool13", "features.relu14", "features.relu15"]


def direct_site_ci(model, module_names, batches, backend="torch"):
    """name -> (mean CI per channel at the named module's output over ``batches``, computed
    outside the collector; its bound against the collector's).

    ``batches`` are the collector's, so that both see the same activation bits (a conv at
    another batch size may round differently). The bound is twice the SPEC bar, averaged over
    the images: the collector's backend and this one are each within the bar of the exact CI.
    """
    parts = [site_activations(model, module_names, b) for b in batches]
    out = {}
    for n in module_names:
        acts = torch.cat([p[n] for p in parts])
        out[n] = (pccfast.channel_independence(acts, backend=backend).mean(0),
                  ci_tolerance(acts, results=2).mean())
    return out


@pytest.fixture(scope="module")
def vgg_and_images():
    torch.manual_seed(0)
    return vgg16_cifar(width=0.125), torch.randn(10, 3, 32, 32)


def test_vgg_sites_are_chips(vgg_and_images):
    model, images = vgg_and_images
    col = pccfast.CICollector(model, input_size=(1, 3, 32, 32))
    prunable = pccfast.prune.build_graph(model, (1, 3, 32, 32)).prunable
    assert [col.groups[g.name] for g in prunable] == [[s] for s in CHIP_VGG_SITES]
    assert col.groups["features.conv16"] == ["features.relu16"]  # scored too (classifier input)
    col.remove()


def test_scores_equal_direct_ci(vgg_and_images):
    model, images = vgg_and_images
    col = pccfast.CICollector(model)
    assert col.update(images[:6]) == 6 and col.update(images[6:]) == 4
    scores = col.scores()
    expected = direct_site_ci(model, CHIP_VGG_SITES + ["features.relu16"], [images[:6], images[6:]])
    assert set(scores) == {f"features.conv{i}"
                           for i in (0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 16)}
    for layer, sites in col.groups.items():
        assert scores[layer].dtype == torch.float64 and scores[layer].device.type == "cpu"
        assert_within(scores[layer], *expected[sites[0]])
    assert all(float(s.max()) > 0 for s in scores.values())
    col.remove()


def test_image_cap_and_same_images_for_every_layer(vgg_and_images):
    model, images = vgg_and_images
    col = pccfast.CICollector(model, max_images=7)
    assert [col.update(images[:4]), col.update(images[4:]), col.update(images)] == [4, 3, 0]
    assert col.images == 7 and set(col._seen.values()) == {7}
    first7 = direct_site_ci(model, ["features.relu0", "features.relu15"], [images[:4], images[4:7]])
    site = col.site_scores()
    assert_within(site["features.relu0"], *first7["features.relu0"])
    assert_within(site["features.relu15"], *first7["features.relu15"])
    col.remove()


def test_collector_ignores_other_forwards_and_restores_the_mode(vgg_and_images):
    model, images = vgg_and_images
    model.train()
    with pccfast.CICollector(model) as col:
        with pytest.raises(RuntimeError, match="no CI yet"):
            col.scores()
        col.update(images[:2])
        assert model.training
        model(images)  # the user's own forward: not collected
        assert col.images == 2 and set(col._seen.values()) == {2}
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    model.eval()


def test_stream_score_is_the_mean_over_its_sites():
    torch.manual_seed(1)
    model = resnet56_cifar(width=0.25)
    images = torch.randn(4, 3, 32, 32)
    col = pccfast.CICollector(model)
    col.update(images)
    groups = col.groups
    assert groups["layer1"] == ["relu"] + [f"layer1.{i}.relu2" for i in range(9)]
    assert groups["layer2.3.conv1"] == ["layer2.3.relu1"]
    direct = direct_site_ci(model, groups["layer1"], [images])
    expected = torch.stack([direct[s][0] for s in groups["layer1"]]).mean(0)
    bound = torch.stack([direct[s][1] for s in groups["layer1"]]).mean()
    assert_within(col.scores()["layer1"], expected, bound)
    col.remove()


def test_resnet50_sites_reuse_the_relu_module():
    model = resnet50(width=0.125)
    col = pccfast.CICollector(model, input_size=(1, 3, 64, 64))
    assert col.groups["conv1"] == ["maxpool"]  # CHIP scores the stem after the max-pool
    assert col.groups["layer1.0.conv1"] == ["layer1.0.relu:0"]
    assert col.groups["layer1.0.conv2"] == ["layer1.0.relu:1"]
    assert col.groups["layer1"] == [f"layer1.{i}.relu:2" for i in range(3)]
    col.update(torch.randn(2, 3, 64, 64))
    assert all(v.numel() == model.get_submodule(k).out_channels if k.endswith(("conv1", "conv2"))
               else True for k, v in col.scores().items())
    col.remove()


def test_layers_subset_and_bad_arguments(vgg_and_images):
    model, images = vgg_and_images
    col = pccfast.CICollector(model, layers=["features.conv3", "features.conv0"])
    col.update(images[:2])
    assert list(col.scores()) == ["features.conv3", "features.conv0"]
    col.remove()
    with pytest.raises(ValueError, match="does not score"):
        pccfast.CICollector(model, layers=["features.norm0"], input_size=(1, 3, 32, 32))
    with pytest.raises(ValueError, match="max_images"):
        pccfast.CICollector(model, max_images=0)
    with pytest.raises(ValueError, match="backend"):
        pccfast.CICollector(model, backend="gpu")
    col = pccfast.CICollector(model)
    with pytest.raises(ValueError, match="images"):
        col.update(torch.randn(3, 32, 32))
    col.remove()


def test_run_over_a_loader_and_the_scores_file(vgg_and_images, tmp_path):
    model, images = vgg_and_images
    labels = torch.zeros(len(images), dtype=torch.long)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_size=3)
    col = pccfast.CICollector(model, max_images=8, progress=False).run(loader)
    assert col.images == 8
    scores = col.scores()
    col.save(tmp_path / "ci.pt")
    loaded = pccfast.CICollector.load_scores(tmp_path / "ci.pt")
    assert loaded.keys() == scores.keys()
    for k in scores:
        assert torch.equal(loaded[k], scores[k])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    col.remove()
    torch.save({"features.conv0": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a pccfast scores file"):
        pccfast.CICollector.load_scores(tmp_path / "foreign.pt")
    data = (tmp_path / "ci.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        pccfast.CICollector.load_scores(tmp_path / "cut.pt")


def _ddp_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)
    images = torch.randn(12, 3, 32, 32)
    col = pccfast.CICollector(model, max_images=8)  # 4 per rank
    col.update(images[rank * 6: rank * 6 + 6])  # each rank takes its first 4
    torch.save(col.scores(), os.path.join(out_dir, f"rank{rank}.pt"))
    col.save(os.path.join(out_dir, "ci.pt"))
    dist.destroy_process_group()


def test_ddp_sums_are_all_reduced(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125)
    images = torch.randn(12, 3, 32, 32)
    col = pccfast.CICollector(model)
    batch = torch.cat([images[0:4], images[6:10]])
    col.update(batch)
    expected = col.scores()
    # Another process and batch size may round an image's Gram matrix differently (the BLAS
    # may split it over other threads): twice the SPEC bar, averaged over the images.
    acts = site_activations(model, [sites[0] for sites in col.groups.values()], batch)
    bound = {k: ci_tolerance(acts[sites[0]], results=2).mean() for k, sites in col.groups.items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for k in expected:
            assert_within(got[k], expected[k], bound[k])
    saved = pccfast.CICollector.load_scores(tmp_path / "ci.pt")
    assert_within(saved["features.conv0"], expected["features.conv0"], bound["features.conv0"])


@pytest.mark.gpu
def test_cuda_collection_matches_cpu(vgg_and_images, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # keeps the bound below tight
    model, images = vgg_and_images
    cpu = pccfast.CICollector(model)
    cpu.update(images)
    expected = cpu.scores()
    cpu.remove()
    gpu_model = vgg16_cifar(width=0.125).cuda()
    gpu_model.load_state_dict(model.state_dict())
    col = pccfast.CICollector(gpu_model, input_size=(1, 3, 32, 32))
    sites = {k: s[0] for k, s in col.groups.items()}
    gpu_acts, handles = {}, []
    for site in set(sites.values()):  # what the collector sees (cuDNN may use TF32)
        handles.append(gpu_model.get_submodule(site).register_forward_hook(
            lambda m, a, out, site=site: gpu_acts.__setitem__(site, out.detach().cpu())))
    col.update(images.cuda())
    for h in handles:
        h.remove()
    cpu_acts = site_activations(model, list(set(sites.values())), images)
    for k, v in col.scores().items():
        a, b = cpu_acts[sites[k]], gpu_acts[sites[k]]
        # |CI_c(A) - CI_c(B)| <= 2 ||A - B||_* (zeroing a row does not raise a nuclear norm),
        # plus each device's SPEC bar: per image, then averaged.
        moved = 2 * torch.linalg.matrix_norm((a - b).double().flatten(2), ord="nuc")
        bound = (moved[:, None] + ci_tolerance(a) + ci_tolerance(b)).mean()
        assert_within(v, expected[k], bound)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_dead_channels_tie_at_zero_and_the_plan_keeps_the_lower_index(backend):
    """Channels a ReLU always zeroes score exactly 0 through the collector (CI's rounding noise
    is snapped in pccfast.channel_independence, which every backend passes through), so the
    plan's "ties to the lower index" decides among them, not noise."""
    from pccfast.ops import _C

    if backend == "cpu" and _C.extension() is None:
        pytest.skip(str(_C.unavailable_reason()))
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 12, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(12, 8, 3, padding=1),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    dead = [2, 5, 9]
    with torch.no_grad():
        model[0].weight[dead] = 0.0
        model[0].bias[dead] = -1.0
    images = torch.randn(6, 3, 10, 10)
    col = pccfast.CICollector(model, backend=backend, progress=False)
    col.update(images)
    scores = col.scores()
    col.remove()
    assert (scores["0"][dead] == 0).all(), scores["0"][dead]
    assert (scores["0"][[c for c in range(12) if c not in dead]] > 0).all()
    _, plan = pccfast.prune(model, scores, rates=[2 / 12], input_size=(1, 3, 10, 10))
    kept = {layer.name: layer.kept_indices for layer in plan.layers}["0"]
    assert kept == [c for c in range(12) if c not in (5, 9)]



def test_a_compiled_model_is_scored_pruned_and_saved_as_the_original(tmp_path):
    """torch.compile(model): scores keyed by the original names, equal to the original's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = vgg16_cifar(width=0.125).eval()
    compiled = torch.compile(model, backend="eager")
    images = torch.randn(6, 3, 32, 32)
    got = pccfast.scores(compiled, [images], criterion="ci", progress=False)
    expected = pccfast.scores(model, [images], criterion="ci", progress=False)
    assert list(got) == list(expected) and "features.conv0" in got
    for name in got:
        assert torch.equal(got[name], expected[name]), name
    pruned, plan = pccfast.prune(compiled, got, target_flops=0.5)
    _, same = pccfast.prune(model, expected, target_flops=0.5)
    assert plan.kept == same.kept
    pccfast.save(compiled, tmp_path / "model.pt")
    loaded = pccfast.load(tmp_path / "model.pt")
    assert list(loaded.state_dict()) == list(model.state_dict())
    torch._dynamo.reset()
