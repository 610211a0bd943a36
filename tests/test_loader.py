import pytest
import torch

from cnnlab.data.loader import DeviceLoader, fits, random_crop, random_flip


def _batch(n=16, c=3, size=8):
    return torch.randint(1, 256, (n, c, size, size), dtype=torch.uint8)


def test_random_crop_shifts_within_padding():
    x = _batch()
    g = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):  # every output image is some 8x8 window of its padded input
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # 16 images: some must have moved


def test_random_flip_flips_about_half():
    x = _batch(n=200)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[i], x[i].flip(2)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 60 < sum(flipped) < 140


def test_loader_covers_each_sample_once_and_normalises():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).clone()
    labels = torch.arange(10)
    loader = DeviceLoader(images, labels, batch_size=3, mean=(0.5,), std=(0.25,),
                          device=torch.device("cpu"), shuffle=True,
                          generator=torch.Generator().manual_seed(1))
    assert len(loader) == 4
    seen = []
    for x, y in loader:
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 4, 4)
        expected = (y.float() / 255 - 0.5) / 0.25  # each image's pixel value is its label
        torch.testing.assert_close(x[:, 0, 0, 0], expected)
        seen += y.tolist()
    assert sorted(seen) == list(range(10)) and seen != list(range(10))


def test_augmented_batches_keep_labels_and_range():
    images, labels = _batch(n=32, size=32), torch.arange(32) % 10
    loader = DeviceLoader(images, labels, batch_size=8, mean=(0.0,) * 3, std=(1.0,) * 3,
                          device=torch.device("cpu"), shuffle=True,
                          augment=frozenset({"crop", "flip"}),
                          generator=torch.Generator().manual_seed(0), channels_last=True)
    for x, y in loader:
        assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        assert x.min() >= 0 and x.max() <= 1
        # the label travels with its image: the centre survives a crop of 4 with or w/o flip
        for img, label in zip(x, y):
            src = images[label::10].float() / 255
            centre = img[:, 12:20, 12:20]
            assert any(torch.allclose(centre, s[:, 12 + dy:20 + dy, 12 + dx:20 + dx])
                       or torch.allclose(centre, s.flip(2)[:, 12 + dy:20 + dy, 12 + dx:20 + dx])
                       for s in src for dy in range(-4, 5) for dx in range(-4, 5))


def test_seed_preset_normalisation_is_to_tensor_only():
    images = torch.full((2, 1, 2, 2), 255, dtype=torch.uint8)
    loader = DeviceLoader(images, torch.zeros(2, dtype=torch.long), batch_size=2, mean=(0.13,),
                          std=(0.3,), device=torch.device("cpu"), normalize=False)
    x, _ = next(iter(loader))
    torch.testing.assert_close(x, torch.ones_like(x))


def test_ranks_slice_each_global_batch_and_drop_a_too_small_last_one():
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1)
    labels = torch.arange(5)
    seen = []
    for rank in (0, 1):
        loader = DeviceLoader(images, labels, batch_size=2, mean=(0.0,), std=(1.0,),
                              device=torch.device("cpu"), shuffle=True, rank=rank, world_size=2,
                              generator=torch.Generator().manual_seed(3))
        assert len(loader) == 2  # the last global batch (1 image) cannot feed 2 ranks
        seen.append([y.tolist() for _, y in loader])
    single = DeviceLoader(images, labels, batch_size=2, mean=(0.0,), std=(1.0,),
                          device=torch.device("cpu"), shuffle=True,
                          generator=torch.Generator().manual_seed(3))
    batches = [y.tolist() for _, y in single][:2]
    assert [a + b for a, b in zip(seen[0], seen[1])] == batches


def test_channels_last_gives_one_channel_batches_nhwc_strides():
    # .contiguous(channels_last) keeps NCHW strides for one channel, and oneDNN then returns
    # the first convolution's output (and so every pooling after it) in NCHW
    loader = DeviceLoader(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4),
                          batch_size=4, mean=(0.5,), std=(0.5,), device=torch.device("cpu"),
                          channels_last=True)
    x, _ = next(iter(loader))
    assert x.stride() == (784, 1, 28, 1)
    conv = torch.nn.Conv2d(1, 6, 5, padding=2).to(memory_format=torch.channels_last)
    assert conv(x).is_contiguous(memory_format=torch.channels_last)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_split_streamed_from_host_memory_gives_the_same_batches(device):
    """A split too large for the GPU stays in (pinned) host memory and each batch is gathered
    there and copied over: the batches are those of a split held on the device."""
    images = torch.randint(0, 256, (70, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(70) % 10
    device = torch.device(device)

    def batches(resident):
        loader = DeviceLoader(images, labels, batch_size=16, mean=(0.5,) * 3, std=(0.2,) * 3,
                              device=device, shuffle=True,
                              augment=frozenset({"crop", "flip"}),
                              generator=torch.Generator(device).manual_seed(1),
                              resident=resident)
        assert loader.resident is resident
        order = loader.new_order()
        return list(loader.batches(order, 1))  # from the second batch, as a resume would

    for (xa, ya), (xb, yb) in zip(batches(True), batches(False), strict=True):
        assert xa.device.type == device.type and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert fits(images, device)
