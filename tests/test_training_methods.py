"""The training methods the finetune loop calls (lowrank_compress/training/): each test states the paper's equation
it checks and derives the expected values independently (numpy least squares, SVD, brute force)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lowrank_compress
from lowrank_compress.finetune import FinetuneSettings, finetune
from lowrank_compress.training import lora_pro
from tests.fixtures import training_text

FAST = {"seq_len": 64, "rank": 4, "eval_tokens": 0, "batch_size": 2, "steps": 4}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(training_text(12_000), encoding="utf-8")
    return path


def settings(data: Path, **kw: object) -> FinetuneSettings:
    return FinetuneSettings(data=str(data), **{**FAST, **kw})


def rand(*shape: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


# --------------------------------------------------------------------------------------------------- LoRA-Pro


def reachable_map(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """The matrix of the linear map vec(dA, dB) -> vec(s (B dA + dB A)), column by column (brute force)."""
    r, n = a.shape
    m = b.shape[0]
    cols = []
    for k in range(r * n + m * r):
        e = np.zeros(r * n + m * r)
        e[k] = 1.0
        da, db = e[: r * n].reshape(r, n), e[r * n :].reshape(m, r)
        cols.append((s * (b @ da + db @ a)).ravel())
    return np.stack(cols, axis=1)


def lora_grads(a: np.ndarray, b: np.ndarray, g: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """LoRA's gradients for W' = W + s B A: dL/dA = s B^T G, dL/dB = s G A^T (chain rule)."""
    return s * b.T @ g, s * g @ a.T


@pytest.mark.parametrize("shape", [(7, 5, 2), (6, 9, 3)])
def test_lora_pro_update_is_the_least_squares_projection_of_the_full_gradient(
    shape: tuple[int, int, int],
) -> None:
    """LoRA-Pro Theorem 2: s (B g_A' + g_B' A) = argmin over reachable updates of ||. - G||_F, checked against
    numpy's least-squares solve over the vectorized map (dA, dB) -> s (B dA + dB A)."""
    m, n, r = shape
    a, b, g, s = rand(r, n, seed=1), rand(m, r, seed=2), rand(m, n, seed=3), 1.7
    ga, gb = lora_grads(a, b, g, s)
    new_a, new_b = lora_pro.adjust(*(torch.from_numpy(t) for t in (a, b, ga, gb)), s)
    update = s * (b @ new_a.numpy() + new_b.numpy() @ a)
    mat = reachable_map(a, b, s)
    best = mat @ np.linalg.lstsq(mat, g.ravel(), rcond=None)[0]
    np.testing.assert_allclose(update.ravel(), best, rtol=1e-8, atol=1e-9)
    plain = (s * (b @ ga + gb @ a)).ravel()  # plain LoRA's equivalent gradient is farther from G
    assert np.linalg.norm(plain - g.ravel()) > np.linalg.norm(best - g.ravel())


def test_lora_pro_sylvester_term_keeps_the_gradients_closest_to_loras() -> None:
    """LoRA-Pro Theorem 3: among (g_A' + Y A, g_B' - B Y), which all give the same update, X from the Sylvester
    equation B^T B X + X A A^T = -(1/s^2) (B^T B)^-1 g_A A^T is the one closest to LoRA's (g_A, g_B): a brute-force
    least-squares solve over every r x r Y finds Y = 0 on top of it."""
    m, n, r, s = 8, 6, 3, 0.5
    a, b, g = rand(r, n, seed=4), rand(m, r, seed=5), rand(m, n, seed=6)
    ga, gb = lora_grads(a, b, g, s)
    new_a, new_b = (t.numpy() for t in lora_pro.adjust(*(torch.from_numpy(t) for t in (a, b, ga, gb)), s))
    cols = []
    for k in range(r * r):
        y = np.zeros(r * r)
        y[k] = 1.0
        y = y.reshape(r, r)
        cols.append(np.concatenate([(y @ a).ravel(), (-b @ y).ravel()]))
    target = np.concatenate([(ga - new_a).ravel(), (gb - new_b).ravel()])
    y_best = np.linalg.lstsq(np.stack(cols, axis=1), target, rcond=None)[0]
    assert np.abs(y_best).max() < 1e-8


def test_sylvester_solver_matches_scipy() -> None:
    from scipy.linalg import solve_sylvester

    p, q = rand(4, 4, seed=7), rand(3, 3, seed=8)
    p, q, c = p @ p.T, q @ q.T, rand(4, 3, seed=9)
    x = lora_pro.solve_sylvester_sym(torch.from_numpy(p), torch.from_numpy(q), torch.from_numpy(c)).numpy()
    np.testing.assert_allclose(x, solve_sylvester(p, q, c), rtol=1e-9, atol=1e-10)


def test_lora_pro_at_loras_start_projects_on_a() -> None:
    """At B = 0 (LoRA's start) g_A = 0 and the projection is G P_A, P_A = A^T (A A^T)^-1 A: no division by zero."""
    a, g, s = rand(2, 6, seed=10), rand(5, 6, seed=11), 2.0
    b = np.zeros((5, 2))
    ga, gb = lora_grads(a, b, g, s)
    new_a, new_b = (t.numpy() for t in lora_pro.adjust(*(torch.from_numpy(t) for t in (a, b, ga, gb)), s))
    np.testing.assert_allclose(s * (b @ new_a + new_b @ a), g @ np.linalg.pinv(a) @ a, rtol=1e-9, atol=1e-12)


def test_lora_pro_hook_rewrites_peft_gradients_and_adamw_leaves_them() -> None:
    """On a peft LoRA layer, autograd's gradients are LoRA's (s B^T G, s G A^T with G = dL/dW'); the LoRA-Pro hook
    replaces them by `adjust`'s, and a plain AdamW run has no such hook (the loop then trains plain LoRA)."""
    from peft import LoraConfig, get_peft_model

    from lowrank_compress.training.methods import build_methods

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False)).double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).pow(2).sum().backward()
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, float(layer.scaling["default"])
    w = (layer.base_layer.weight + s * b @ a).detach().requires_grad_(True)
    (x @ w.T).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, s * b.detach().T @ w.grad)
    torch.testing.assert_close(b.grad, s * w.grad @ a.detach().T)
    expected = lora_pro.adjust(a.detach(), b.detach(), a.grad, b.grad, s)

    class FakeRun:
        accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()

    FakeRun.model = model
    lora_pro.LoraPro().on_gradients(FakeRun())
    torch.testing.assert_close(a.grad, expected[0])
    torch.testing.assert_close(b.grad, expected[1])
    assert not any(m.name == "lora_pro" for m in build_methods(FinetuneSettings()))
    assert any(m.name == "lora_pro" for m in build_methods(FinetuneSettings(optimizer="lora-pro")))


def test_lora_pro_trains_end_to_end_and_differs_from_lora_after_the_first_step(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    plain = finetune(factorized, tmp_path / "plain", settings(data, lr=5e-3))
    pro = finetune(factorized, tmp_path / "pro", settings(data, lr=5e-3, optimizer="lora-pro"))
    assert pro.losses[0] == pytest.approx(plain.losses[0], rel=1e-6)  # the same model before any step
    assert pro.losses[1:] != pytest.approx(plain.losses[1:], rel=1e-6)
    assert pro.methods["lora_pro"]["layers"] > 0
    PeftModel.from_pretrained(lowrank_compress.load(factorized), tmp_path / "pro")


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "lora-pro", "--adapter", "dora"], "--optimizer lora-pro works on LoRA's factors"),
        (["--optimizer", "lora-pro", "--train", "factors"], "--optimizer lora-pro works on LoRA's factors"),
    ],
)
def test_methods_on_the_wrong_adapter_fail_in_one_line(
    factorized: Path, data: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    from tests.test_finetune import _fails_cleanly, run

    out = tmp_path / "o"
    res = run("finetune", factorized, "--data", data, "--steps", "1", "--seq-len", "64", "-o", out, *flags)
    assert message in _fails_cleanly(res, out)
