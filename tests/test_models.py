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
    """The parameter count at the input a model was designed for (and near the figure others
    publish), and the smallest images it takes (one pixel less is refused), as the registry
    states; built on the meta device, where shapes are checked and no weights are made."""
    for name in MODELS:
        about = entry(name)
        c, h, w = about.designed_for
        with torch.device("meta"):
            model = create_model(name, in_channels=c, num_classes=10, image_size=(h, w))
            assert count_parameters(model) == about.parameters, name
            if about.published_parameters:
                assert abs(about.parameters / about.published_parameters - 1) < 0.1, name
            side = about.min_size
            small = create_model(name, in_channels=c, num_classes=10, image_size=(side, side))
            assert small.eval()(torch.zeros(2, c, side, side)).shape == (2, 10), name
            if side > 1:
                with pytest.raises((CnnlabError, RuntimeError)):
                    too_small = create_model(name, in_channels=c, num_classes=10,
                                             image_size=(side - 1, side - 1))
                    too_small.eval()(torch.zeros(2, c, side - 1, side - 1))


def test_the_family_in_imagenet_form_is_torchvisions_model():
    """On images above the small-image form's size the family's models are torchvision's
    ImageNet models: the same state-dict keys and parameter count (3 channels, 1000
    classes); built on the meta device."""
    import torchvision

    names = {"vgg11": "vgg11_bn", "vgg13": "vgg13_bn", "vgg16": "vgg16_bn",
             "vgg19": "vgg19_bn", "mobilenetv2": "mobilenet_v2"}
    family = [name for name in MODELS if entry(name).imagenet_form]
    assert {"alexnet", "vgg16", "googlenet", "resnet50", "densenet121"} <= set(family)
    with torch.device("meta"):
        for name in family:
            ours = create_model(name, in_channels=3, num_classes=1000, image_size=(224, 224))
            extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
            theirs = getattr(torchvision.models, names.get(name, name))(**extra)
            assert list(ours.state_dict()) == list(theirs.state_dict()), name
            assert count_parameters(ours) == count_parameters(theirs), name


def test_registry_errors():
    with pytest.raises(CnnlabError, match="unknown model 'inception'.*lenet5, alexnet"):
        create_model("inception", in_channels=1, num_classes=10, image_size=(28, 28))
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


# The models whose step, resume and export take seconds each: in the whole suite, not in
# `make test-fast` (which still runs the others through the same test)
_HEAVY = {"densenet121", "resnet101", "resnet50", "resnet34", "googlenet", "vgg13", "vgg16",
          "vgg19", "alexnet"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from conftest import write_cifar, write_mnist

    root = tmp_path_factory.mktemp("family")
    return {"mnist": write_mnist(root / "mnist", n_train=8, n_test=4),
            "cifar10": write_cifar(root / "cifar", n_train=10, n_test=4)}


# Models built by the very code of another with other depths alone (models/family.py's
# builders: VGG's configurations, ResNet-101's block counts): trained, resumed and exported
# through their sibling; their shapes are checked below with every model's
_DEPTHS_OF = {"vgg13": "vgg11", "vgg16": "vgg11", "vgg19": "vgg11", "resnet101": "resnet50"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _HEAVY else n
                                  for n in MODELS if n not in _DEPTHS_OF])
def test_every_model_trains_resumes_and_exports(name, tiny_data, tmp_path):
    """Every registered model, on the data it was designed for (LeNet-5 on MNIST-like
    1x28x28, the others on CIFAR-like 3x32x32; the heavy ones on MNIST-like data too;
    test_every_model_takes_mnist_and_cifar_shaped_images checks both shapes for all): one
    step, one more after --resume, then exported (torch.export;
    TorchScript for the heavy ones, whose torch.export trace takes seconds) and checked
    against PyTorch on the test images."""
    import cnnlab
    from cnnlab.export import export_model

    # the heavy ones on MNIST's smaller images: the same code, a quarter less work
    dataset = "mnist" if entry(name).designed_for[0] == 1 or name in _HEAVY else "cifar10"
    run = tmp_path / "run"
    assert cnnlab.train(name, dataset, data_dir=str(tiny_data[dataset]), out=run, epochs=1,
                        batch_size=10, eval_batch_size=4, precision="fp32",
                        schedule="constant", telemetry=0, progress=False)["steps"] == 1
    resumed = cnnlab.train(resume=str(run), epochs=2, progress=False)
    assert resumed["steps"] == 2 and resumed["resumed_from_step"] == 1
    info = export_model(run, "torchscript" if name in _HEAVY else "export",
                        data_dir=str(tiny_data[dataset]))
    assert info["parity"]["max_rel_diff"] <= 1e-4 and "test images" in \
        info["parity"]["checked_on"]


def test_every_model_takes_mnist_and_cifar_shaped_images():
    """1x28x28 and 3x32x32 give one score per class for every model (meta device: shapes
    only), as the CIFAR literature adapts them."""
    for variant, sibling in _DEPTHS_OF.items():  # the same code: one builder's closures
        assert builder(variant).__code__ is builder(sibling).__code__, variant
    for name in MODELS:
        with torch.device("meta"):
            for c, side in ((1, 28), (3, 32)):
                model = create_model(name, in_channels=c, num_classes=10,
                                     image_size=(side, side)).eval()
                assert model(torch.zeros(2, c, side, side)).shape == (2, 10), (name, c)


def test_cnnlab_models_lists_every_model_with_its_paper_and_size(capsys):
    import json

    from cnnlab.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "what", "it", "is", "paper", "parameters", "(10",
                                "classes)", "images"]
    for name in MODELS:
        e = entry(name)
        [line] = [line for line in lines if line.startswith(f"{name} ")]
        assert f"{e.year}" in line and f"{e.parameters:,} at " in line, line
    assert "vgg16 " in "\n".join(lines) and "ImageNet form above 64x64" in "\n".join(lines)
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["model"] for m in listed] == list(MODELS)
    assert listed[0]["options"] == {"pool": {"default": "max", "choices": ["max", "avg"],
                                             "help": "the pooling after each convolution"}}
