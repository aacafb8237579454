"""Tests for models/: networks (numbers, seeding, parameter counts, HVPs) and data sets."""

import ast
import gzip
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # models/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

import models  # noqa: E402
from models import (MLP, DiagonalLinearNetwork, Split, TinyTransformer, digits, load_mnist,
                    mnist1d, modular_addition, num_parameters, paper_mlp, read_idx,
                    sparse_regression, teacher_dataset)  # noqa: E402

F64 = torch.float64


def _randn(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --- layering ------------------------------------------------------------------------------------

def test_rdsim_never_imports_models():
    for f in (REPO / "rdsim").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            assert not any(n == "models" or n.startswith("models.") for n in names), f


def test_public_names():
    for name in models.__all__:
        assert hasattr(models, name), name


# --- diagonal linear network ---------------------------------------------------------------------

def test_dln_forward_is_X_times_product_of_factors():
    net = DiagonalLinearNetwork(7, depth=3, init="gaussian", init_scale=0.8, seed=3, dtype=F64)
    X = _randn(5, 7, seed=1)
    w = [p.detach() for p in net.parameters()]
    beta = w[0] * w[1] * w[2]
    torch.testing.assert_close(net.beta().detach(), beta, rtol=0, atol=0)
    torch.testing.assert_close(net(X).detach(), X @ beta, rtol=1e-15, atol=1e-15)
    # flat layout = concatenate(w_1, ..., w_depth) = parameters_to_vector
    flat = net.flat_params()
    assert flat.shape == (21,)
    torch.testing.assert_close(flat, torch.cat(w), rtol=0, atol=0)
    torch.testing.assert_close(flat, torch.nn.utils.parameters_to_vector(net.parameters()),
                               rtol=0, atol=0)
    # round trips
    twin = DiagonalLinearNetwork.from_flat(flat, depth=3)
    assert (twin.p, twin.depth, twin.w[0].dtype) == (7, 3, F64)
    torch.testing.assert_close(twin(X), net(X), rtol=0, atol=0)
    x = torch.arange(21, dtype=F64)
    net.set_flat(x)
    torch.testing.assert_close(net.w[1].detach(), torch.arange(7, 14, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(net.flat_params(), x, rtol=0, atol=0)


def test_dln_inits_and_seeding():
    const = DiagonalLinearNetwork(4, depth=2, dtype=F64)  # rdsim.losses.dln default state 0.1
    assert const.flat_params().tolist() == [0.1] * 8
    even = DiagonalLinearNetwork(3, init="even", init_scale=0.5, dtype=F64)
    assert even.w[0].tolist() == [math.sqrt(2) * 0.5] * 3 and even.w[1].tolist() == [0.0] * 3
    a = DiagonalLinearNetwork(50, init="gaussian", init_scale=1.0, seed=7, dtype=F64)
    b = DiagonalLinearNetwork(50, init="gaussian", init_scale=1.0, seed=7, dtype=F64)
    c = DiagonalLinearNetwork(50, init="gaussian", init_scale=1.0, seed=8, dtype=F64)
    f32 = DiagonalLinearNetwork(50, init="gaussian", init_scale=1.0, seed=7, dtype=torch.float32)
    assert torch.equal(a.flat_params(), b.flat_params())
    assert not torch.equal(a.flat_params(), c.flat_params())
    torch.testing.assert_close(f32.flat_params(), a.flat_params().float(), rtol=0, atol=0)
    assert 0.6 < a.flat_params().std().item() < 1.4


@pytest.mark.parametrize("kwargs, name", [
    (dict(p=0), "p"), (dict(p=3, depth=0), "depth"), (dict(p=3, init="xavier"), "init"),
    (dict(p=3, depth=3, init="even"), "init"), (dict(p=3, seed=-1), "seed"),
    (dict(p=3, init_scale=float("nan")), "init_scale"),
])
def test_dln_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiagonalLinearNetwork(**kwargs)
    with pytest.raises(ValueError, match="x"):
        DiagonalLinearNetwork(3).set_flat(torch.zeros(5))


def test_dln_matches_rdsim_numba_loss():
    try:
        from rdsim.losses import dln
    except Exception as e:  # the numba loss lives in rdsim, edited elsewhere
        pytest.skip(f"rdsim.losses.dln unavailable: {e}")
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((6, 4)), rng.standard_normal(6)
    x = rng.standard_normal(12)
    loss = dln(X, y, depth=3)
    net = DiagonalLinearNetwork.from_flat(torch.tensor(x), depth=3)
    value = 0.5 * ((net(torch.tensor(X)) - torch.tensor(y)) ** 2).mean()
    grad = torch.autograd.grad(value, list(net.parameters()))
    assert loss.value(x) == pytest.approx(value.item(), rel=1e-12)
    np.testing.assert_allclose(loss.grad(x), torch.cat(grad).numpy(), rtol=1e-10, atol=1e-12)


# --- MLP -----------------------------------------------------------------------------------------

def test_paper_mlp_parameter_count_and_structure():
    net = paper_mlp(784, 10)
    assert num_parameters(net) == 784 * 16 + 16 * 16 + 16 * 10 == 12_960
    assert [tuple(p.shape) for p in net.parameters()] == [(16, 784), (16, 16), (10, 16)]
    assert not net.bias and net.activation == "relu" and net.depth == 3
    assert num_parameters(paper_mlp(64, 10)) == 1_440
    assert num_parameters(paper_mlp(40, 10)) == 1_056


@pytest.mark.parametrize("in_dim, out_dim, width, depth, bias", [
    (10, 1, 32, 3, True), (5, 3, 7, 1, True), (5, 3, 7, 2, False), (4, 2, 6, 5, True),
])
def test_mlp_parameter_count_formula(in_dim, out_dim, width, depth, bias):
    net = MLP(in_dim, out_dim, width, depth, bias=bias)
    if depth == 1:
        expected = in_dim * out_dim + bias * out_dim
    else:
        expected = (in_dim * width + (depth - 2) * width ** 2 + width * out_dim
                    + bias * ((depth - 1) * width + out_dim))
    assert num_parameters(net) == expected


@pytest.mark.parametrize("activation, fn", [("relu", torch.relu), ("tanh", torch.tanh),
                                            ("gelu", F.gelu), ("identity", lambda t: t)])
def test_mlp_forward_by_hand(activation, fn):
    net = MLP(6, 3, 5, 3, bias=True, activation=activation, seed=2, dtype=F64)
    (W1, b1), (W2, b2), (W3, b3) = [(l.weight.detach(), l.bias.detach()) for l in net.layers]
    x = _randn(4, 6, seed=5)
    expected = fn(fn(x @ W1.T + b1) @ W2.T + b2) @ W3.T + b3
    torch.testing.assert_close(net(x).detach(), expected, rtol=1e-14, atol=1e-14)
    # image-shaped inputs are flattened
    torch.testing.assert_close(net(x.reshape(4, 2, 3)), net(x), rtol=0, atol=0)


def test_mlp_seeding_and_init_distribution():
    state = torch.get_rng_state()
    a, b = MLP(784, 10, 16, 3, seed=0, dtype=F64), MLP(784, 10, 16, 3, seed=0, dtype=F64)
    c = MLP(784, 10, 16, 3, seed=1, dtype=F64)
    f32 = MLP(784, 10, 16, 3, seed=0, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    vec = torch.nn.utils.parameters_to_vector
    assert torch.equal(vec(a.parameters()), vec(b.parameters()))
    assert not torch.equal(vec(a.parameters()), vec(c.parameters()))
    torch.testing.assert_close(vec(f32.parameters()), vec(a.parameters()).float(), rtol=0, atol=0)
    W = a.layers[0].weight.detach()
    bound = 1 / math.sqrt(784)
    assert W.abs().max() <= bound
    assert W.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)  # U(-b, b)


@pytest.mark.parametrize("kwargs, name", [
    (dict(activation="swish"), "activation"), (dict(width=0), "width"), (dict(depth=0), "depth"),
    (dict(in_dim=2.5), "in_dim"), (dict(seed=None), "seed"),
])
def test_mlp_bad_arguments(kwargs, name):
    args = dict(in_dim=4, out_dim=2, width=3, depth=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        MLP(**args)


# --- tiny transformer ----------------------------------------------------------------------------

def _transformer(**kw):
    args = dict(vocab=7, d_model=8, n_heads=2, n_layers=2, max_len=6, seed=0, dtype=F64)
    args.update(kw)
    return TinyTransformer(**args)


def test_transformer_parameter_count():
    net = _transformer(d_ff=12)
    V, d, L, T, ff = 7, 8, 2, 6, 12
    per_block = (4 * d * d + 4 * d) + (2 * d * ff + ff + d) + 4 * d
    assert num_parameters(net) == V * d + T * d + L * per_block + 2 * d + d * V


def test_transformer_attention_matches_torch_sdpa_and_is_causal():
    net = _transformer()
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 2, 2]])
    attn = net.blocks[0].attn
    x = _randn(2, 6, 8, seed=3)
    q, k, v = attn.qkv(x).split(8, dim=-1)
    q, k, v = (t.reshape(2, 6, 2, 4).transpose(1, 2) for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 8)
    torch.testing.assert_close(attn(x), attn.out(ref), rtol=1e-12, atol=1e-12)
    # changing the token at position 3 leaves the logits at positions 0..2 unchanged
    logits = net(tokens)
    assert logits.shape == (2, 6, 7)
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 7
    other = net(changed)
    torch.testing.assert_close(other[:, :3], logits[:, :3], rtol=0, atol=0)
    assert (other[:, 3:] - logits[:, 3:]).abs().max() > 1e-6


# torch's jvp decompositions warn about torch.jit.script on first use (not our code)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_transformer_hvp_forward_over_reverse_matches_double_backward():
    net = _transformer()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 7, (3, 6), generator=g)
    targets = torch.randint(0, 7, (3, 6), generator=g)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    vec = {k: _randn(*p.shape, seed=i) for i, (k, p) in enumerate(params.items())}

    def loss(ps):
        logits = functional_call(net, ps, (tokens,))
        return F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))

    _, hvp = torch.func.jvp(torch.func.grad(loss), (params,), (vec,))
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    dot = sum((gr * vec[k]).sum() for gr, k in zip(grads, leaves))
    hvp2 = torch.autograd.grad(dot, list(leaves.values()))
    flat = torch.cat([hvp[k].reshape(-1) for k in params])
    flat2 = torch.cat([h.reshape(-1) for h in hvp2])
    assert torch.isfinite(flat).all() and flat.abs().max() > 1e-3
    torch.testing.assert_close(flat, flat2, rtol=0, atol=1e-6)
    # and it is the derivative of the gradient (central differences)
    h = 1e-5
    gp = torch.func.grad(loss)({k: params[k] + h * vec[k] for k in params})
    gm = torch.func.grad(loss)({k: params[k] - h * vec[k] for k in params})
    fd = torch.cat([((gp[k] - gm[k]) / (2 * h)).reshape(-1) for k in params])
    torch.testing.assert_close(fd, flat, rtol=0, atol=1e-6)


def test_transformer_bad_arguments():
    with pytest.raises(ValueError, match="n_heads"):
        _transformer(d_model=9, n_heads=2)
    with pytest.raises(ValueError, match="max_len"):
        _transformer()(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        _transformer()(torch.zeros(1, 3))


def test_transformer_seeding():
    vec = torch.nn.utils.parameters_to_vector
    assert torch.equal(vec(_transformer().parameters()), vec(_transformer().parameters()))
    assert not torch.equal(vec(_transformer().parameters()),
                           vec(_transformer(seed=1).parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_networks_on_cuda_match_cpu():
    cuda = torch.device("cuda")
    nets = [lambda **kw: DiagonalLinearNetwork(6, 3, init="gaussian", seed=1, **kw),
            lambda **kw: MLP(6, 2, 8, 3, activation="gelu", seed=1, **kw),
            lambda **kw: _transformer(**kw)]
    inputs = [_randn(4, 6), _randn(4, 6), torch.tensor([[1, 2, 3], [4, 5, 6]])]
    for make, x in zip(nets, inputs):
        cpu, gpu = make(dtype=F64), make(dtype=F64, device=cuda)
        assert all(p.device.type == "cuda" for p in gpu.parameters())
        vec = torch.nn.utils.parameters_to_vector
        torch.testing.assert_close(vec(gpu.parameters()).cpu(), vec(cpu.parameters()), rtol=0,
                                   atol=0)
        torch.testing.assert_close(gpu(x.to(cuda)).cpu(), cpu(x), rtol=1e-10, atol=1e-10)
    split = sparse_regression(10, 5, 2, device=cuda)
    assert split.train[0].device.type == "cuda" and split.info["support"].device.type == "cuda"


# --- sparse regression ---------------------------------------------------------------------------

def test_sparse_regression_numbers():
    split = sparse_regression(20, 30, 4, seed=1, n_test=50, dtype=F64)
    (X, y), (Xt, yt) = split
    beta = split.info["beta_star"]
    assert X.shape == (20, 30) and y.shape == (20,) and Xt.shape == (50, 30) and yt.shape == (50,)
    assert int((beta != 0).sum()) == 4
    assert sorted(beta[beta != 0].abs().tolist()) == [1.0] * 4
    assert torch.equal(split.info["support"], torch.nonzero(beta).reshape(-1))
    torch.testing.assert_close(y, X @ beta, rtol=0, atol=1e-14)
    torch.testing.assert_close(yt, Xt @ beta, rtol=0, atol=1e-14)


def test_sparse_regression_reproducible_and_nested():
    a = sparse_regression(30, 10, 3, seed=5, dtype=F64)
    b = sparse_regression(30, 10, 3, seed=5, dtype=F64)
    c = sparse_regression(30, 10, 3, seed=6, dtype=F64)
    for s, t in zip(a.train + a.test, b.train + b.test):
        assert torch.equal(s, t)
    assert not torch.equal(a.train[0], c.train[0])
    # X and beta* do not depend on the noise; the train set does not depend on n_test
    noisy = sparse_regression(30, 10, 3, seed=5, noise=0.5, n_test=7, dtype=F64)
    assert torch.equal(noisy.train[0], a.train[0])
    assert torch.equal(noisy.info["beta_star"], a.info["beta_star"])
    resid = noisy.train[1] - a.train[1]
    assert 0.2 < resid.std().item() < 1.0 and noisy.n_test == 7
    # the first rows do not depend on n
    assert torch.equal(sparse_regression(10, 10, 3, seed=5, dtype=F64).train[0], a.train[0][:10])
    # the float32 version is the rounded float64 version
    f32 = sparse_regression(30, 10, 3, seed=5, dtype=torch.float32)
    assert torch.equal(f32.train[0], a.train[0].float())


@pytest.mark.parametrize("kwargs, name", [
    (dict(sparsity=11), "sparsity"), (dict(sparsity=-1), "sparsity"), (dict(n=0), "n"),
    (dict(noise=-0.1), "noise"), (dict(seed=-3), "seed"), (dict(n_test=-1), "n_test"),
])
def test_sparse_regression_bad_arguments(kwargs, name):
    args = dict(n=5, p=10, sparsity=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sparse_regression(**args)


# --- teacher -------------------------------------------------------------------------------------

def test_teacher_dataset_targets_are_teacher_outputs():
    teacher = MLP(5, 3, 8, 2, seed=4, dtype=F64)
    split = teacher_dataset(teacher, 40, seed=1, n_test=10, dtype=F64)
    (X, y), (Xt, yt) = split
    assert split.info["teacher"] is teacher
    with torch.no_grad():
        torch.testing.assert_close(y, teacher(X), rtol=0, atol=0)
        torch.testing.assert_close(yt, teacher(Xt), rtol=0, atol=0)
    cls = teacher_dataset(teacher, 40, seed=1, n_test=10, task="classification", dtype=F64)
    assert cls.train[1].dtype == torch.int64
    assert torch.equal(cls.train[0], X) and torch.equal(cls.train[1], y.argmax(1))
    noisy = teacher_dataset(teacher, 40, seed=1, noise=0.1, dtype=F64)
    assert 0.05 < (noisy.train[1] - y).std().item() < 0.2


def test_teacher_dataset_from_spec_is_reproducible():
    spec = {"in_dim": 6, "out_dim": 1, "width": 10, "depth": 3, "activation": "tanh"}
    a, b = teacher_dataset(spec, 25, seed=3), teacher_dataset(spec, 25, seed=3)
    assert a.train[0].shape == (25, 6) and a.train[1].shape == (25, 1)
    assert torch.equal(a.train[1], b.train[1]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[1], teacher_dataset(spec, 25, seed=4).train[1])
    with pytest.raises(ValueError, match="teacher"):
        teacher_dataset({"in_dim": 6, "wdth": 3}, 5)
    with pytest.raises(ValueError, match="task"):
        teacher_dataset(spec, 5, task="ranking")
    with pytest.raises(ValueError, match="in_dim"):
        teacher_dataset(torch.nn.Tanh(), 5)


# --- digits --------------------------------------------------------------------------------------

def test_digits_shapes_range_and_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    split = digits(seed=0, dtype=F64)
    (X, y), (Xt, yt) = split
    assert X.shape == (1438, 64) and Xt.shape == (359, 64)
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert X.min().item() == 0.0 and X.max().item() == 1.0 and Xt.max().item() <= 1.0
    # a split of the whole data set: the class counts add up
    full = load_digits()
    counts = torch.bincount(torch.cat([y, yt]), minlength=10).numpy()
    np.testing.assert_array_equal(counts, np.bincount(full.target))
    np.testing.assert_allclose(torch.cat([X, Xt]).sum().item() * 16, full.data.sum())
    again = digits(seed=0, dtype=F64)
    assert torch.equal(again.train[0], X) and torch.equal(again.test[1], yt)
    assert not torch.equal(digits(seed=1, dtype=F64).train[1], y)
    std = digits(seed=0, scale="standard", dtype=F64)
    m = std.train[0].mean(0)
    assert m.abs().max().item() < 1e-12
    assert std.train[0].std(0, unbiased=False).max().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="test_fraction"):
        digits(test_fraction=1.0)
    with pytest.raises(ValueError, match="scale"):
        digits(scale="minmax")


# --- MNIST-1D ------------------------------------------------------------------------------------

def test_mnist1d_properties():
    np_state = np.random.get_state()[1].copy()
    split = mnist1d(200, seed=0, dtype=F64)
    assert np.array_equal(np.random.get_state()[1], np_state)  # no global numpy RNG use
    (X, y), (Xt, yt) = split
    assert X.shape == (160, 40) and Xt.shape == (40, 40)
    allx = torch.cat([X, Xt])
    assert abs(allx.mean().item()) < 1e-12 and allx.std(unbiased=False).item() == pytest.approx(1)
    assert torch.bincount(torch.cat([y, yt])).tolist() == [20] * 10
    assert split.info["t"].shape == (40,)
    again = mnist1d(200, seed=0, dtype=F64)
    assert torch.equal(again.train[0], X) and torch.equal(again.test[1], yt)
    assert not torch.equal(mnist1d(200, seed=1, dtype=F64).train[0], X)
    with pytest.raises(ValueError, match="n"):
        mnist1d(205)
    with pytest.raises(ValueError, match="padding"):
        mnist1d(20, padding=(5, 2))
    with pytest.raises(ValueError, match="colour"):
        mnist1d(20, colour=1)


def test_mnist1d_matches_reference_package():
    """Our generator reproduces mnist1d.data.make_dataset bit for bit (default settings)."""
    pkg = pytest.importorskip("mnist1d.data")
    state = np.random.get_state()
    try:
        ref = pkg.make_dataset(pkg.get_dataset_args())  # reseeds numpy's global RNG
    finally:
        np.random.set_state(state)
    (X, y), (Xt, yt) = ours = mnist1d(dtype=F64)
    np.testing.assert_array_equal(X.numpy(), ref["x"])
    np.testing.assert_array_equal(Xt.numpy(), ref["x_test"])
    np.testing.assert_array_equal(y.numpy(), ref["y"])
    np.testing.assert_array_equal(yt.numpy(), ref["y_test"])
    np.testing.assert_array_equal(ours.info["t"].numpy(), ref["t"])


# --- modular addition ----------------------------------------------------------------------------

def test_modular_addition_labels_and_split():
    split = modular_addition(97, 0.4, seed=0, dtype=F64)
    (X, y), (Xt, yt) = split
    assert X.shape == (3763, 194) and Xt.shape == (9409 - 3763, 194)
    for inputs, labels, pairs in ((X, y, split.info["train_pairs"]),
                                  (Xt, yt, split.info["test_pairs"])):
        assert torch.equal(inputs.sum(1), torch.full((len(labels),), 2.0, dtype=F64))
        a, b = inputs[:, :97].argmax(1), inputs[:, 97:].argmax(1)
        assert torch.equal(torch.stack([a, b], 1), pairs)
        assert torch.equal(labels, (a + b) % 97)
    codes = torch.cat([split.info["train_pairs"], split.info["test_pairs"]]) @ torch.tensor([97, 1])
    assert torch.equal(codes.sort().values, torch.arange(97 * 97))  # a partition of all pairs
    again = modular_addition(97, 0.4, seed=0, dtype=F64)
    assert torch.equal(again.train[1], y)
    assert not torch.equal(modular_addition(97, 0.4, seed=1).train[1], y)


def test_modular_addition_tokens_feed_the_transformer():
    split = modular_addition(11, 0.5, seed=2, encoding="tokens")
    (T, y), (Tt, yt) = split
    assert T.dtype == torch.int64 and T.shape == (60, 3) and Tt.shape == (61, 3)
    assert split.info["vocab"] == 12 and bool((T[:, 2] == 11).all())
    assert torch.equal(y, (T[:, 0] + T[:, 1]) % 11)
    net = TinyTransformer(vocab=split.info["vocab"], d_model=8, n_heads=2, n_layers=1, max_len=3)
    assert net(T)[:, -1, :11].shape == (60, 11)


@pytest.mark.parametrize("kwargs, name", [
    (dict(p=1), "p"), (dict(train_fraction=0.0), "train_fraction"),
    (dict(train_fraction=1.5), "train_fraction"), (dict(encoding="binary"), "encoding"),
])
def test_modular_addition_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        modular_addition(**kwargs)


# --- MNIST IDX loader ----------------------------------------------------------------------------

def _write_idx(path, array, code, compress):
    array = np.asarray(array)
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    big = array.astype(array.dtype.newbyteorder(">"))
    raw = header + big.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def tiny_mnist(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, 0x08, True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", labels, 0x08, False)
    return tmp_path, images, labels


def test_load_mnist_round_trip(tiny_mnist):
    path, images, labels = tiny_mnist
    X, y = load_mnist(path, "train", dtype=F64)
    assert X.shape == (5, 784) and X.dtype == F64 and y.dtype == torch.int64
    np.testing.assert_array_equal(X.numpy() * 255, images.reshape(5, -1).astype(np.float64))
    assert y.tolist() == [3, 1, 4, 1, 5]
    raw, _ = load_mnist(str(path), flatten=False, normalize=False)
    assert raw.dtype == torch.uint8 and raw.shape == (5, 28, 28)
    np.testing.assert_array_equal(raw.numpy(), images)


def test_load_mnist_test_kind_dot_spelling_and_other_idx_types(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "t10k-images.idx3-ubyte", images, 0x08, False)
    _write_idx(tmp_path / "t10k-labels.idx1-ubyte.gz", np.array([9, 0], np.uint8), 0x08, True)
    X, y = load_mnist(tmp_path, "test", flatten=False, dtype=F64)
    assert X.shape == (2, 3, 4) and y.tolist() == [9, 0]
    torch.testing.assert_close(X * 255, torch.from_numpy(images).to(F64), rtol=0, atol=1e-12)
    floats = np.array([[1.5, -2.0], [0.25, 1e30]])
    _write_idx(tmp_path / "f.idx", floats, 0x0E, False)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)
    ints = np.array([70000, -5, 3], dtype=np.int32)
    _write_idx(tmp_path / "i.idx", ints, 0x0C, True)
    np.testing.assert_array_equal(read_idx(tmp_path / "i.idx"), ints)


def test_load_mnist_errors(tiny_mnist, tmp_path):
    path, images, labels = tiny_mnist
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(path, "t10k")
    with pytest.raises(FileNotFoundError, match="no folder"):
        load_mnist(path / "missing")
    with pytest.raises(ValueError, match="kind"):
        load_mnist(path, "validation")
    # label count differs from image count
    _write_idx(path / "train-labels-idx1-ubyte", labels[:4], 0x08, False)
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_mnist(path)
    # truncated data and a non-IDX file
    (path / "bad.idx").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 9)
    with pytest.raises(ValueError, match="announces"):
        read_idx(path / "bad.idx")
    (path / "text.idx").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(path / "text.idx")


# --- Split ---------------------------------------------------------------------------------------

def test_split_container():
    split = modular_addition(5, 0.6, seed=0, dtype=torch.float32)
    assert isinstance(split, Split) and len(split) == 2
    (X, y), (Xt, yt) = split
    assert (split.n_train, split.n_test) == (15, 10)
    moved = split.to(dtype=F64)
    assert moved.train[0].dtype == F64 and moved.train[1].dtype == torch.int64
    assert torch.equal(moved.train[0], X.double()) and moved.info is split.info
    assert "Split(train=[(15, 10) float32, (15,) int64]" in repr(split)


def test_dln_gradient_under_functional_call():
    """Regression: the gradient of every layer survives torch.func.functional_call."""
    import torch

    from models import DiagonalLinearNetwork

    net = DiagonalLinearNetwork(3, depth=3, init="gaussian", seed=1, dtype=torch.float64)
    X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p):
        return 0.5 * ((torch.func.functional_call(net, (p,), (X,)) - y) ** 2).mean()

    g = torch.func.grad(loss)(params)
    w = [params[f"w.{i}"] for i in range(3)]
    r = X @ (w[0] * w[1] * w[2]) - y
    gb = X.T @ r / 5
    for i in range(3):
        others = [w[j] for j in range(3) if j != i]
        torch.testing.assert_close(g[f"w.{i}"], gb * others[0] * others[1], rtol=1e-12, atol=1e-12)
