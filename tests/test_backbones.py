"""The paper's backbones: shapes and parameter counts, and SE/TR/MR on them (tiny inputs)."""

import pytest
import torch

import fsmtl
from fsmtl.data import Benchmark, Split
from fsmtl.models import ResNet18Trunk, SegNetTrunk, build_model, dense_head
from fsmtl.strategies import METHODS, MethodOptions
from fsmtl.strategies.architecture.base import modulation_points
from fsmtl.tasks import Task
from fsmtl.tasks.losses import task_loss


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_resnet18_trunk_parameters_and_shape():
    trunk = ResNet18Trunk()
    assert n_params(trunk) == 11_176_512  # torchvision resnet18's 11,689,512 minus its fc (512*1000+1000)
    trunk.eval()
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 64, 64)).shape == (2, 512)
        assert trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(trunk.stem(torch.randn(1, 3, 64, 64)))))).shape == (
            1,
            512,
            2,
            2,
        )
    assert modulation_points(trunk) == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]


def test_segnet_trunk_parameters_and_shape():
    trunk = SegNetTrunk()
    assert n_params(trunk) == 24_943_296
    trunk.eval()
    with torch.no_grad():
        assert trunk(torch.randn(1, 3, 32, 64)).shape == (1, 64, 32, 64)
    assert len(modulation_points(trunk)) == 10


def tiny_benchmark(shape, tasks, targets):
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    split = Split([x] * len(tasks), targets)
    return Benchmark("tiny", tasks, True, shape, split, split, split)


def cityscapes_like():
    g = torch.Generator().manual_seed(0)
    tasks = [Task("segmentation", "segmentation", 7), Task("depth", "depth", 1)]
    targets = [torch.randint(0, 7, (4, 32, 64), generator=g), torch.rand(4, 1, 32, 64, generator=g) + 0.1]
    return tiny_benchmark((3, 32, 64), tasks, targets)


def celeba_like():
    tasks = [Task("a", "binary", 1), Task("b", "binary", 1)]
    return tiny_benchmark((3, 32, 32), tasks, [torch.tensor([0.0, 1, 0, 1]), torch.tensor([1.0, 1, 0, 0])])


def test_build_model_by_backbone_name():
    m = build_model(celeba_like(), backbone="resnet18")
    assert isinstance(m.trunk, ResNet18Trunk) and m.heads[0].in_features == 512
    m = build_model(cityscapes_like(), backbone="segnet")
    assert isinstance(m.trunk, SegNetTrunk)
    assert m(cityscapes_like().train.inputs[0][:1], 0).shape == (1, 7, 32, 64)
    with pytest.raises(ValueError, match="does not fit per-pixel"):
        build_model(cityscapes_like(), backbone="resnet18")
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_model(celeba_like(), backbone="vgg")


def narrow(backbone, b):
    """The backbone's layout at 1/8 of its width (the same modulation points, fast on CPU)."""
    if backbone == "resnet18":
        trunk = ResNet18Trunk(widths=(8, 16, 32, 64))
        return fsmtl.MultiTaskModel(trunk, [torch.nn.Linear(64, t.num_outputs) for t in b.tasks])
    trunk = SegNetTrunk(widths=(8, 16, 32, 64, 64))
    return fsmtl.MultiTaskModel(trunk, [dense_head(8, t.num_outputs) for t in b.tasks])


@pytest.mark.parametrize("method", ["se", "tr", "mr"])
@pytest.mark.parametrize("bench, backbone", [(celeba_like, "resnet18"), (cityscapes_like, "segnet")])
def test_modulated_methods_on_the_backbones(method, bench, backbone):
    torch.manual_seed(0)
    b = bench()
    model = narrow(backbone, b)
    strategy = METHODS[method].build(MethodOptions(keep_ratio=0.5))
    trainer = fsmtl.Trainer(model, b.tasks, strategy, torch.optim.SGD(model.parameters(), 1e-3))
    trainer.fit(b.train, epochs=1, batch_size=2)
    points = modulation_points(model.trunk)
    channels = strategy.architecture.channels
    assert len(channels) == len(points)
    if method != "se":
        assert [int(m[0].sum()) for m in strategy.architecture.masks] == [c // 2 for c in channels]
    # The two tasks see different trunk outputs; the shared weights got the dense task average.
    x = b.train.inputs[0][:2]
    model.eval()
    with torch.no_grad():
        feats = []
        for t in range(2):
            model.current_task = t
            feats.append(model.trunk(x))
        model.current_task = None
    assert not torch.allclose(feats[0], feats[1])
    model.train()
    model.zero_grad(set_to_none=True)
    losses = [task_loss(task, model(x, t), y[:2]) for t, (task, y) in enumerate(zip(b.tasks, b.train.targets))]
    strategy.backward(losses)
    assert all(p.grad is not None for p in model.shared_parameters())
