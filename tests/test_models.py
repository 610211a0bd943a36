import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS, builder, count_parameters, create_model, entry, options_of


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_lenet5_matches_the_report(pool):
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=(28, 28),
                         pool=pool)
    assert count_parameters(model) == 61_706
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    pools = [m for m in model.modules() if isinstance(m, (torch.nn.MaxPool2d,
                                                            torch.nn.AvgPool2d))]
    expected = torch.nn.MaxPool2d if pool == "max" else torch.nn.AvgPool2d
    assert len(pools) == 2 and all(type(m) is expected for m in pools)


def test_lenet5_adapts_to_colour_and_size():
    model = create_model("lenet5", in_channels=3, num_classes=7, image_size=(32, 32))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    # conv1 3*6*25+6, conv2 2416, fc1 576*120+120, fc2 10164, fc3 84*7+7
    assert count_parameters(model) == 456 + 2416 + 69240 + 10164 + 595


def test_resnet18_cifar_variant():
    model = create_model("resnet18", in_channels=3, num_classes=10, image_size=(32, 32))
    assert count_parameters(model) == 11_173_962
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    stem = model.conv1  # torchvision's name, with the CIFAR stem's shape
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.out_channels == 64
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 20  # stem + 16 block convs + 3 projections, each with BN


def test_resnet18_grayscale():
    model = create_model("resnet18", in_channels=1, num_classes=10, image_size=(28, 28))
    model.eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_registry_names_each_builders_options():
    import inspect

    shape = {"in_channels", "num_classes", "image_size"}
    for name in MODELS:
        parameters = inspect.signature(builder(name)).parameters
        assert options_of(name) == tuple(p for p in parameters if p not in shape), name
        for option, about in entry(name).options.items():  # the defaults the report names
            assert about.default == parameters[option].default, (name, option)
            assert about.default in about.choices, (name, option)


def test_each_registry_entry_is_true_of_its_model():
    """The parameter count at the input a model was designed for, and the smallest images
    it takes (one pixel less is refused with the size it needs), as the registry states."""
    for name in MODELS:
        about = entry(name)
        c, h, w = about.designed_for
        model = create_model(name, in_channels=c, num_classes=10, image_size=(h, w))
        assert count_parameters(model) == about.parameters, name
        side = about.min_size
        small = create_model(name, in_channels=c, num_classes=10, image_size=(side, side))
        assert small(torch.zeros(2, c, side, side)).shape == (2, 10), name
        if side > 1:
            with pytest.raises((CnnlabError, RuntimeError)):
                too_small = create_model(name, in_channels=c, num_classes=10,
                                         image_size=(side - 1, side - 1))
                too_small(torch.zeros(2, c, side - 1, side - 1))


def test_registry_errors():
    with pytest.raises(CnnlabError, match="unknown model 'vgg'.*lenet5, resnet18"):
        create_model("vgg", in_channels=1, num_classes=10, image_size=(28, 28))
    with pytest.raises(CnnlabError, match="resnet18 has no option 'pool'"):
        create_model("resnet18", in_channels=3, num_classes=10, image_size=(32, 32), pool="avg")
    with pytest.raises(CnnlabError, match="at least 12x12"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=(8, 8))


def test_lenet5_pools_before_relu_with_the_same_function_and_gradients():
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=(28, 28))
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    relu_first = torch.nn.Sequential(convs[0], torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                     convs[1], torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    x = torch.randn(8, 1, 28, 28)
    grads = []
    for features in (model.features, relu_first):
        model.zero_grad()
        out = features(x)
        out.square().sum().backward()
        grads.append((out.detach(), [c.weight.grad.clone() for c in convs]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)
    # checkpoints name the same parameters in either order
    assert [k for k in model.state_dict() if k.startswith("features")] == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"]
