"""Data: the embedded digits split, resumable streams, noise inputs, clear errors for real sets."""
import pytest
import torch

from nern_fast.config import DataConfig
from nern_fast.data import (DataError, LoaderStream, NoiseStream, TensorStream, load_cifar,
                            load_digits, load_imagenet, load_task_data)


def test_digits_split_is_fixed_and_standardised():
    a = load_digits(split_seed=0)
    b = load_digits(split_seed=0)
    assert a.num_classes == 10 and a.input_shape == (1, 8, 8)
    assert a.train_size + a.test_size == 1797 and a.test_size == 359
    assert torch.equal(a._test[0], b._test[0]) and torch.equal(a._train[1], b._train[1])
    x = a._train[0]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    c = load_digits(split_seed=1)
    assert not torch.equal(a._test[1], c._test[1])
    big = load_digits(image_size=12)
    assert big.input_shape == (1, 12, 12) and big._train[0].shape[-1] == 12


@pytest.mark.parametrize("fraction, match", [(0.9999, "leaves 1797 test and 0 training"),
                                              (0.0001, "leaves 0 test and 1797 training")])
def test_digits_split_that_leaves_a_side_empty_is_refused(fraction, match):
    """An empty training split made every image NaN (its mean and std) and fit ran on without a
    word; an empty test split failed later, in the evaluation."""
    with pytest.raises(DataError, match=f"data.test_fraction {fraction} {match}"):
        load_digits(test_fraction=fraction)


def test_model_outputs_and_input_channels_must_fit_the_data():
    """num_classes below the data's classes failed in the loss (a raw IndexError), in_channels
    other than the images' in the first conv: both are config errors naming the key."""
    from nern_fast.config import ConfigError, ModelConfig
    from nern_fast.train.setup import make_network
    task = load_digits()
    with pytest.raises(ConfigError, match="model.num_classes: 5 outputs, but the digits data has 10"):
        make_network(ModelConfig(arch="cifar_resnet20", num_classes=5), task)
    with pytest.raises(ConfigError, match="teacher.in_channels: 3, but the digits images have 1"):
        make_network(ModelConfig(arch="cifar_resnet20", in_channels=3), task, "teacher")
    assert make_network(ModelConfig(arch="cifar_resnet20", num_classes=12), task) is not None


def test_test_batches_cover_the_test_set_in_order():
    task = load_digits()
    batches = list(task.test_batches(100, "cpu"))
    assert sum(len(y) for _, y in batches) == task.test_size
    assert torch.equal(torch.cat([y for _, y in batches]), task._test[1])
    assert len(list(task.test_batches(100, "cpu", max_batches=2))) == 2


def _take(stream, n):
    return [stream.next() for _ in range(n)]


def test_tensor_stream_epochs_and_resume():
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    s = TensorStream(x, y, 3, "cpu", seed=4)
    assert s.steps_per_epoch == 3  # drop_last
    first = _take(s, 3)
    seen = torch.cat([b[1] for b in first])
    assert len(set(seen.tolist())) == 9  # one epoch: no repeats
    state = s.state_dict()
    rest = _take(s, 5)
    again = TensorStream(x, y, 3, "cpu", seed=4)
    again.load_state_dict(state)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rest, _take(again, 5)))
    other = TensorStream(x, y, 3, "cpu", seed=5)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, _take(other, 3)))


def test_loader_stream_resumes_the_same_order():
    ds = torch.utils.data.TensorDataset(torch.arange(20.0)[:, None], torch.arange(20))
    s = LoaderStream(ds, 4, "cpu", seed=1, num_workers=0)
    assert s.steps_per_epoch == 5
    _take(s, 7)
    state = s.state_dict()
    assert state == {"epoch": 1, "position": 2}
    rest = [b[1] for b in _take(s, 6)]
    again = LoaderStream(ds, 4, "cpu", seed=1, num_workers=0)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [b[1] for b in _take(again, 6)]))
    with pytest.raises(DataError, match="fewer than one batch"):
        LoaderStream(ds, 64, "cpu")


def test_in_memory_stream_refuses_a_set_smaller_than_a_batch_as_the_loader_does():
    """It used to shrink the batch to the set's size without a word (another batch size than the
    config's); without drop_last one partial batch per epoch remains, as with the loader."""
    x, y = torch.randn(10, 1, 4, 4), torch.arange(10)
    with pytest.raises(DataError, match="the training set has 10 samples, fewer than one batch of 16"):
        TensorStream(x, y, 16, "cpu")
    partial = TensorStream(x, y, 16, "cpu", drop_last=False)
    assert partial.steps_per_epoch == 1 and len(partial.next()[1]) == 10


def test_noise_stream_shape_range_and_resume():
    task = load_digits()
    s = task.noise_stream(5, "cpu", seed=2)
    x, y = s.next()
    assert x.shape == (5, 1, 8, 8) and (y == -1).all()
    raw = x * task.std[0] + task.mean[0]  # uniform pixels in [0, 1] before normalisation
    assert float(raw.min()) >= -1e-5 and float(raw.max()) <= 1 + 1e-5
    state = s.state_dict()
    a = s.next()[0]
    s2 = task.noise_stream(5, "cpu", seed=2)
    s2.load_state_dict(state)
    assert torch.equal(a, s2.next()[0])
    g = NoiseStream((3, 4, 4), 2, "cpu", kind="gaussian")
    assert g.next()[0].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="uniform' or 'gaussian"):
        NoiseStream((1, 2, 2), 1, "cpu", kind="salt")


def test_cifar_missing_names_the_folder(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path.resolve()) + r".*cifar-10-batches-py"):
        load_cifar("cifar10", str(tmp_path), download=False)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_cifar("cifar100", str(tmp_path), download=False)


def test_imagenet_folders(tmp_path):
    with pytest.raises(DataError, match=r"train is not a folder"):
        load_imagenet(str(tmp_path))
    from PIL import Image
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(d / "x.png")
    task = load_task_data(DataConfig(dataset="imagenet", root=str(tmp_path), image_size=32))
    assert task.num_classes == 2 and task.input_shape == (3, 32, 32)
    x, y = next(task.test_batches(2, "cpu"))
    assert x.shape == (2, 3, 32, 32)


def test_imagenet_class_folders_must_have_the_same_names(tmp_path):
    """Labels are the sorted folder positions: val/ with other names (same count) mixed labels up."""
    from PIL import Image
    for split, classes in (("train", ("a", "b")), ("val", ("a", "c"))):
        for cls in classes:
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(d / "x.png")
    with pytest.raises(DataError, match=r"same names .* in one only: \['b', 'c'\]"):
        load_imagenet(str(tmp_path))
