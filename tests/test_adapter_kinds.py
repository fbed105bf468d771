"""The adapter family beyond LoRA / DoRA: C3A, GraLoRA, Bone (MiSS) on factorized, dense and NF4 models.

Expected values come from each paper's definition of the update, built here with numpy / scipy from the adapter's
parameters, never from lowrank_compress's own delta code: the forward pass must equal x (W + ΔW)^T.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import lowrank_compress
from lowrank_compress.adapter_kinds import OURS, AdapterOptions, c3a_block_size, delta_of, peft_config
from lowrank_compress.adapters import (
    adapter_targets,
    attach,
    extract_adapters,
    merge_adapters,
    merged_weight,
    register_peft,
)
from lowrank_compress.modules import LowRankLinear
from tests.fixtures import tiny_llama
from tests.test_adapters import logits

KINDS = ["c3a", "gralora", "bone", "singlora", "loldu", "bora", "surm"]
OPTIONS = {
    "c3a": {"block_size": 16},
    "gralora": {"blocks": 2},
    "bone": {},
    "singlora": {"ramp_steps": 10},
    "loldu": {},
    "bora": {},
    "surm": {},
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("dense"))


def load(path: Path) -> nn.Module:
    """A factorize output or a dense checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def randomize(peft_model: nn.Module, seed: int = 0) -> None:
    """Trained-looking adapters: every adapter parameter drawn at random (their zero init would test nothing), and
    SingLoRA's ramp part way up (u = 0.3 of T = 10)."""
    from lowrank_compress.peft_methods import set_step

    set_step(peft_model, 3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# --------------------------------------------------------------------------------------------------- references


def c3a_reference(kernel: np.ndarray, n_in: int) -> np.ndarray:
    """C3A (Chen et al., Eq. 2-3): each b x b block of ΔW is a circulant matrix, applied as a circular convolution
    by FFT; the update is divided by the input width (peft). peft stores each block's first row, so the block is the
    transpose of scipy's circulant (which takes the first column)."""
    m, n, _ = kernel.shape
    return np.block([[scipy.linalg.circulant(kernel[i, j]).T for j in range(n)] for i in range(m)]) / n_in


def gralora_reference(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """GraLoRA (Jung et al., Eq. 4): W split into k x k blocks, block (j, n) has its own rank-r/k LoRA
    B_{j,n} A_{j,n}; peft stores A_n (in/k x r) per input block and B_j (r x out/k) per output block, the r columns
    (rows) cut into k chunks, chunk j of A_n pairing with chunk n of B_j."""
    k, _, r = a.shape
    s = r // k
    blocks = [
        [(a[n][:, j * s : (j + 1) * s] @ b[j][n * s : (n + 1) * s, :]).T for n in range(k)] for j in range(k)
    ]
    return scale * np.block(blocks)


def bone_reference(block: np.ndarray, n_in: int) -> np.ndarray:
    """MiSS (Kang et al., balance form): ΔW = [D^T D^T ... D^T], the r x out block D repeated along the input, the
    input chunked in r-wide pieces (a ragged last piece uses D's first columns)."""
    r = block.shape[0]
    return np.tile(block.T, (1, -(-n_in // r)))[:, :n_in]


def singlora_reference(a: np.ndarray, n_out: int, n_in: int, scale: float) -> np.ndarray:
    """SingLoRA (Bensaïd et al., Eq. 3 and Sec. 3.3): ΔW = scale A A^T for a square layer; for d_out > d_in,
    ΔW = A A*^T with A* the first d_in rows of A (d_out x r); transposed roles when d_in > d_out."""
    if n_out >= n_in:
        return scale * a @ a[:n_in].T
    return scale * a[:n_out] @ a.T


def loldu_reference(w: np.ndarray, r: int, scale: float, z: np.ndarray) -> np.ndarray:
    """LoLDU (Shi et al., Eq. 5-7): W = P L D U by LU with partial pivoting (scipy), D = diag of LAPACK's U, U made
    unit upper; the first r components are re-weighted: ΔW = P L_r (sigma diag(z) - D_r) U_r."""
    p, lower, upper = scipy.linalg.lu(w)
    d = np.diag(upper)[:r]
    return (p @ lower)[:, :r] @ np.diag(scale * z - d) @ (upper[:r] / d[:, None])


def bora_reference(
    w: np.ndarray, b: np.ndarray, a: np.ndarray, s: float, m_row: np.ndarray, m_col: np.ndarray
):
    """BoRA (Wang et al., Sec. 3): V = W + s B A; rows normalized and scaled to m_row (DoRA's step), then columns
    normalized and scaled to m_col. Returns (ΔW, the row-scaled intermediate)."""
    v = w + s * b @ a
    v_rows = v * (m_row / np.linalg.norm(v, axis=1))[:, None]
    merged = v_rows * (m_col / np.linalg.norm(v_rows, axis=0))[None, :]
    return merged - w, v_rows


def skew_circulant(h: np.ndarray) -> np.ndarray:
    """The skew-circulant matrix with first column h: Toeplitz, first row (h_0, -h_{n-1}, ..., -h_1)."""
    return scipy.linalg.toeplitz(h, np.concatenate([h[:1], -h[:0:-1]]))


def surm_reference(g: np.ndarray, h: np.ndarray, scale: float, n_out: int, n_in: int) -> np.ndarray:
    """SURM's low-displacement-rank matrix (Sehanobish et al., Sec. 3, after Pan): sum_i circ(g_i) skewcirc(h_i),
    of size n = max(in, out), its top-left out x in corner for a rectangular layer."""
    m = sum(scipy.linalg.circulant(gi) @ skew_circulant(hi) for gi, hi in zip(g, h, strict=True))
    return scale * m[:n_out, :n_in]


def reference(kind: str, layer: nn.Module) -> np.ndarray:
    if kind == "bora":
        p = {
            k: getattr(layer, f"bora_{k}")["default"].detach().double().numpy()
            for k in ("A", "B", "m_row", "m_col")
        }
        w = layer.base_weight().double().numpy()
        return bora_reference(w, p["B"], p["A"], layer.bora_scale["default"], p["m_row"], p["m_col"])[0]
    if kind == "surm":
        g, h = (getattr(layer, f"surm_{k}")["default"].detach().double().numpy() for k in ("g", "h"))
        return surm_reference(g, h, layer.surm_scale["default"], layer.out_features, layer.in_features)
    if kind == "loldu":
        base = layer.get_base_layer()
        w = (
            (base.dense_weight() if isinstance(base, LowRankLinear) else base.weight)
            .detach()
            .double()
            .numpy()
        )
        z = layer.loldu_z["default"].detach().double().numpy()
        return loldu_reference(w, z.shape[0], float(layer.loldu_scale["default"].detach()), z)
    if kind == "singlora":
        u = min(float(layer.singlora_step["default"]) / layer.singlora_ramp["default"], 1.0)
        a = layer.singlora_A["default"].detach().double().numpy()
        return singlora_reference(
            a, layer.out_features, layer.in_features, layer.singlora_scale["default"] * u
        )
    if kind == "c3a":
        return c3a_reference(layer.c3a_kernel["default"].detach().double().numpy(), layer.in_features)
    if kind == "gralora":
        a, b = (p["default"].detach().double().numpy() for p in (layer.gralora_A, layer.gralora_B))
        return gralora_reference(a, b, layer.scaling["default"])
    return bone_reference(layer.miss_block["default"].detach().double().numpy(), layer.in_features)


class One(nn.Module):
    """A single layer as a model, for checking a layer's forward against the math."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def one_layer(factorized: bool, n_out: int = 48, n_in: int = 32) -> One:
    gen = torch.Generator().manual_seed(2)
    if factorized:
        up, down = torch.randn(n_out, 5, generator=gen), torch.randn(5, n_in, generator=gen)
        return One(LowRankLinear.from_factors(up, down, torch.randn(n_out, generator=gen)))
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n_out, n_in, generator=gen))
    return One(layer)


# --------------------------------------------------------------------------------------------------- the math


@pytest.mark.parametrize("factorized", [True, False], ids=["factorized", "dense"])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_the_papers_update(kind: str, factorized: bool) -> None:
    from peft import get_peft_model

    register_peft()
    model = one_layer(factorized)
    base = model.layer
    w = (base.dense_weight() if factorized else base.weight).detach().double().numpy()
    bias = base.bias.detach().double().numpy()
    options = AdapterOptions(rank=4, alpha=8.0, **OPTIONS[kind])
    tuned = get_peft_model(model, peft_config(kind, model, ["layer"], options))
    randomize(tuned)
    layer = tuned.base_model.model.layer
    delta = reference(kind, layer)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    with torch.no_grad():
        y = tuned(x).double().numpy()
    np.testing.assert_allclose(y, x.double().numpy() @ (w + delta).T + bias, rtol=1e-4, atol=1e-4)
    d = delta_of(layer, "default")  # what the merge folds in is the same update
    ours = merged_weight(torch.from_numpy(w), d).numpy() - w
    np.testing.assert_allclose(ours, delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 32), (48, 32), (32, 48)], ids=["square", "tall", "wide"])
def test_singlora_update_is_symmetric_when_square_and_follows_the_ramp(shape: tuple[int, int]) -> None:
    from peft import get_peft_model

    from lowrank_compress.peft_methods import advance

    register_peft()
    model = one_layer(False, *shape)
    tuned = get_peft_model(
        model, peft_config("singlora", model, ["layer"], AdapterOptions(rank=4, ramp_steps=4))
    )
    layer = tuned.base_model.model.layer
    norms = []
    for _ in range(6):  # u(t) = min(t / 4, 1) at t = 0..5
        d = delta_of(layer, "default")
        norms.append(float(torch.linalg.matrix_norm(d.b.double() @ d.a.double())))
        advance(tuned)
    full = norms[4]
    np.testing.assert_allclose(
        norms, [0, full / 4, full / 2, 3 * full / 4, full, full], rtol=1e-6, atol=1e-12
    )
    delta = (d.b.double() @ d.a.double()).numpy()
    assert np.linalg.matrix_rank(delta) == 4
    if shape[0] == shape[1]:
        np.testing.assert_allclose(delta, delta.T, atol=1e-12)


def test_loldu_factors_reconstruct_the_weight_at_full_rank_and_only_the_diagonal_trains() -> None:
    from peft import get_peft_model

    from lowrank_compress.peft_methods.loldu.layer import ldu

    w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pl, u, d = ldu(w, 32)  # full rank: P L D U = W
    torch.testing.assert_close(pl @ torch.diag(d) @ u, w)
    p, lower, upper = scipy.linalg.lu(w.numpy())  # the same factors as scipy's LAPACK LU
    np.testing.assert_allclose(pl.numpy(), (p @ lower)[:, :32], atol=1e-10)
    np.testing.assert_allclose(u.numpy(), upper / np.diag(upper)[:, None], atol=1e-10)
    register_peft()
    model = one_layer(True)  # rank 5 factorized layer: r = 4 fits under its rank
    tuned = get_peft_model(model, peft_config("loldu", model, ["layer"], AdapterOptions(rank=4)))
    trainable = {n.rsplit(".", 2)[-2]: p.numel() for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"loldu_z": 4, "loldu_scale": 1}
    with pytest.raises(lowrank_compress.LowrankError, match="exceeds the rank 5"):
        peft_config("loldu", one_layer(True), ["layer"], AdapterOptions(rank=6))


def test_surm_update_has_the_configured_displacement_rank() -> None:
    """A sum of r circulant x skew-circulant products has Sylvester displacement rank r for the operator
    M -> Z_1 M - M Z_-1 (Z_f: the down-shift with f in the corner), since C commutes with Z_1 and S with Z_-1."""
    from peft import get_peft_model

    register_peft()
    model = one_layer(False, 32, 32)
    tuned = get_peft_model(model, peft_config("surm", model, ["layer"], AdapterOptions(rank=3)))
    randomize(tuned)
    layer = tuned.base_model.model.layer
    d = reference("surm", layer)  # float64, from the parameters; the layer's own ΔW equals it (float32)
    np.testing.assert_allclose(delta_of(layer, "default").dense.double().numpy(), d, atol=1e-6)
    z1 = np.roll(np.eye(32), 1, axis=0)  # Z_1: e_i -> e_{i+1}, cyclically
    zm1 = z1.copy()
    zm1[0, -1] = -1
    assert np.linalg.matrix_rank(z1 @ d - d @ zm1, tol=1e-10 * np.abs(d).max()) == 3
    assert np.linalg.matrix_rank(d) == 32  # unrestricted rank: full


def test_bora_merged_weight_has_the_learned_column_norms_and_row_normed_intermediate(
    factorized: Path,
) -> None:
    """BoRA's two magnitudes: the merged weight's columns have norms m_col exactly (the last normalization); the row
    magnitudes m_row are the row norms of the intermediate before it. (Both norms of one matrix cannot equal two
    independently learned vectors: their squares must sum to the same ||W'||_F^2.)"""
    model = lowrank_compress.load(factorized)
    tuned = attach(model, "bora", 4, 8.0, adapter_targets(model))
    randomize(tuned)
    name, layer = next((n, m) for n, m in tuned.named_modules() if hasattr(m, "bora_A"))
    name = name.removeprefix("base_model.model.")
    p = {
        k: getattr(layer, f"bora_{k}")["default"].detach().double().numpy()
        for k in ("A", "B", "m_row", "m_col")
    }
    w = layer.base_weight().double().numpy()
    _, v_rows = bora_reference(w, p["B"], p["A"], layer.bora_scale["default"], p["m_row"], p["m_col"])
    base, deltas = extract_adapters(tuned)
    merge_adapters(base, deltas, merge_rank="grow")
    merged = base.get_submodule(name).dense_weight().detach().double().numpy()
    np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.abs(p["m_col"]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v_rows, axis=1), np.abs(p["m_row"]), rtol=1e-10)
    np.testing.assert_allclose(
        merged, v_rows * (p["m_col"] / np.linalg.norm(v_rows, axis=0)), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(("n_out", "n_in"), [(12, 12), (12, 9), (7, 12), (1, 1)])
def test_surm_matrix_from_its_diagonals_equals_the_sum_of_circulant_times_skew_circulant(
    n_out: int, n_in: int
) -> None:
    """SURM's M = sum_i circ(g_i) skewcirc(h_i) (Sec. 3), built by the layer from prefix sums along wrapped
    diagonals, equals the product of scipy's dense matrices, and its corner is what the layer applies to x."""
    from lowrank_compress.peft_methods.surm.layer import _ldr_apply, ldr_matrix_t

    n = max(n_out, n_in)
    gen = torch.Generator().manual_seed(n_out * 100 + n_in)
    g, h = (torch.randn(3, n, generator=gen, dtype=torch.float64) for _ in range(2))
    x = torch.randn(5, n_in, generator=gen, dtype=torch.float64)
    m = surm_reference(g.numpy(), h.numpy(), 1.0, n_out, n_in)
    np.testing.assert_allclose(ldr_matrix_t(g, h, n_out, n_in).numpy(), m.T, atol=1e-12)
    np.testing.assert_allclose(_ldr_apply(g, h, x, n_out).numpy(), x.numpy() @ m.T, atol=1e-12)
    with torch.autocast(
        "cpu", dtype=torch.bfloat16
    ):  # bf16 training: the matrix is still built in full precision
        np.testing.assert_allclose(
            ldr_matrix_t(g.float(), h.float(), n_out, n_in).numpy(), m.T, rtol=1e-5, atol=1e-5
        )


def test_c3a_fft_matvec_equals_the_dense_circulant_product() -> None:
    """C3A's premise: circ(w) x computed by FFT (O(b log b)) equals the dense circulant matvec."""
    from peft.tuners.c3a.utils import BlockCircularConvolution

    gen = torch.Generator().manual_seed(0)
    kernel, x = torch.randn(3, 2, 8, generator=gen, dtype=torch.float64), torch.randn(4, 16, generator=gen)
    y = BlockCircularConvolution.apply(x.double(), kernel)
    dense = c3a_reference(kernel.numpy(), 1)  # undivided
    np.testing.assert_allclose(y.numpy(), x.double().numpy() @ dense.T, rtol=1e-10, atol=1e-10)


def test_gralora_update_has_rank_k_times_r_and_bone_rank_r() -> None:
    """GraLoRA's k x k blocks of rank r/k give rank up to k r (its claim of a wider bottleneck for LoRA's count);
    Bone / MiSS's tiled block has rank r."""
    gen = np.random.default_rng(0)
    k, r = 2, 4
    a, b = gen.standard_normal((k, 16, r)), gen.standard_normal((k, r, 24))
    assert np.linalg.matrix_rank(gralora_reference(a, b, 1.0)) == k * r
    assert np.linalg.matrix_rank(bone_reference(gen.standard_normal((r, 24)), 30)) == r


def test_c3a_default_block_size_is_nearest_loras_parameter_count() -> None:
    # 576 x 576 at r = 16: LoRA has 18,432; b must divide 576; 576^2 / 18 = 18,432 exactly
    assert c3a_block_size(576, 576, 16) == 18
    assert c3a_block_size(576, 1536, 16) in {b for b in range(1, 193) if 192 % b == 0}


# --------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_adapters_leave_the_logits_unchanged(factorized: Path, dense: Path, kind: str) -> None:
    for path in (factorized, dense):
        model = load(path)
        before = logits(model)
        tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
        assert any(p.requires_grad for p in tuned.parameters())
        torch.testing.assert_close(logits(tuned), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["factorized", "dense"])
@pytest.mark.parametrize("kind", KINDS)
def test_saved_adapters_load_with_plain_peft(
    factorized: Path, dense: Path, kind: str, which: str, tmp_path: Path
) -> None:
    from peft import PeftModel

    path = factorized if which == "factorized" else dense
    model = load(path)
    tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
    randomize(tuned)
    expected = logits(tuned)
    tuned.save_pretrained(tmp_path / "a")
    peft_type = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"]
    own = {"bone": "MISS"}.get(kind, kind.upper())
    if kind in OURS:  # ours: one type for dense and factorized layers
        assert peft_type == own
    else:  # peft's own type on a dense model (loads without this package), ours around LowRankLinear
        assert peft_type == ("LOWRANK_" + own if which == "factorized" else own)
    reloaded = PeftModel.from_pretrained(load(path), tmp_path / "a")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gralora", "bone", "singlora", "loldu", "bora"])
def test_low_rank_updates_grow_the_factors_exactly(factorized: Path, kind: str) -> None:
    model = lowrank_compress.load(factorized)
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
    randomize(tuned)
    expected = logits(tuned)
    base, deltas = extract_adapters(tuned)
    assert logits(base).sub(expected).abs().max() > 1e-3  # the adapters do something
    report = merge_adapters(base, deltas, merge_rank="grow")
    torch.testing.assert_close(logits(base), expected, rtol=1e-4, atol=1e-4)
    grown = 2 * 4 if kind == "gralora" else 4  # k r, r
    assert {n: int(v["rank_after"]) for n, v in report.items()} == {n: r + grown for n, r in ranks.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_dense_models_merge_exactly(dense: Path, kind: str) -> None:
    model = load(dense)
    tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
    randomize(tuned)
    expected = logits(tuned)
    base, deltas = extract_adapters(tuned)
    merge_adapters(base, deltas, merge_rank="grow")
    torch.testing.assert_close(logits(base), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["c3a", "surm"])
def test_full_rank_updates_refuse_to_grow_and_keep_merge_error_is_the_dropped_tail(
    factorized: Path, kind: str
) -> None:
    """keep: W' = up down + ΔW truncated back to rank r; by Eckart-Young its squared error is the sum of the
    squared singular values of W' beyond r, over their total (computed here from numpy's SVD of W')."""
    model = lowrank_compress.load(factorized)
    tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
    randomize(tuned)
    owned = "c3a_kernel" if kind == "c3a" else "surm_g"
    layers = {n.removeprefix("base_model.model."): m for n, m in tuned.named_modules() if hasattr(m, owned)}
    merged = {
        n: m.get_base_layer().dense_weight().detach().double().numpy() + reference(kind, m)
        for n, m in layers.items()
    }
    base, deltas = extract_adapters(tuned)
    untouched = {n: base.get_submodule(n) for n in layers}
    with pytest.raises(lowrank_compress.LowrankError, match="--merge-rank keep"):
        merge_adapters(base, deltas, merge_rank="grow", kind=kind)
    assert all(base.get_submodule(n) is m for n, m in untouched.items())  # refused before any change
    ranks = {n: base.get_submodule(n).rank for n in layers}
    report = merge_adapters(base, deltas, merge_rank="keep")
    for name, w in merged.items():
        s = np.linalg.svd(w, compute_uv=False)
        tail = float(np.sum(s[ranks[name] :] ** 2) / np.sum(s**2))
        assert report[name]["relative_error"] == pytest.approx(tail, rel=1e-6)
        assert base.get_submodule(name).rank == ranks[name]
        got = base.get_submodule(name).dense_weight().detach().double().numpy()
        np.testing.assert_allclose(np.linalg.norm(w - got) ** 2 / np.sum(s**2), tail, rtol=1e-4)


@pytest.mark.parametrize(
    ("kind", "rank"), [("lora", 4), ("lora", 16), ("gralora", 4), ("c3a", 4), ("surm", 4)]
)
def test_break_even_merge_is_exact_and_stores_dense_where_growing_saves_nothing(
    factorized: Path, kind: str, rank: int
) -> None:
    """break-even: W' = up down + ΔW exactly; a layer stays factorized at rank r + r_a while the grown factors are
    smaller than the dense weight, (r + r_a)(m + n) < m n, and is stored dense otherwise (always for a full-rank
    update). lora r=16 crosses break-even on the 64 x 64 layers (r 19 + 16 > 32) but not on the 64 x 128 ones."""
    model = lowrank_compress.load(factorized)
    before = {n: (m.rank, m.out_features, m.in_features) for n, m in model.named_modules()
              if isinstance(m, LowRankLinear)}  # fmt: skip
    tuned = attach(model, kind, rank, 8.0, adapter_targets(model), **OPTIONS.get(kind, {}))
    randomize(tuned)
    expected = logits(tuned)
    base, deltas = extract_adapters(tuned)
    report = merge_adapters(base, deltas, merge_rank="break-even")
    torch.testing.assert_close(logits(base), expected, rtol=1e-4, atol=1e-4)
    grown = 2 * rank if kind == "gralora" else rank  # k r, r
    stored = {}
    for name, (r, m, n) in before.items():
        module = base.get_submodule(name)
        stored[name] = "dense" if type(module) is nn.Linear else module.rank
        full = kind in ("c3a", "surm") or (r + grown) * (m + n) >= m * n
        assert stored[name] == ("dense" if full else r + grown), name
        assert report[name]["rank_after"] == (None if full else r + grown)
        assert report[name]["relative_error"] == 0.0
    if (kind, rank) == ("lora", 16):
        assert "dense" in stored.values() and any(v != "dense" for v in stored.values())


@pytest.mark.parametrize("which", ["factorized", "dense"])
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_train_on_an_nf4_model(factorized: Path, dense: Path, kind: str, which: str) -> None:
    pytest.importorskip("bitsandbytes")
    from lowrank_compress.peft_methods import advance
    from lowrank_compress.quantize import quantize_nf4

    model = load(factorized if which == "factorized" else dense)
    report = quantize_nf4(model)
    assert report.quantized > 0
    before = logits(model)
    tuned = attach(model, kind, 4, 8.0, adapter_targets(model), **OPTIONS[kind])
    torch.testing.assert_close(logits(tuned), before, rtol=1e-5, atol=1e-5)
    advance(tuned)  # SingLoRA: at u(0) = 0 its gradient is zero too; the others have no schedule
    loss = tuned(input_ids=torch.arange(1, 17)[None], labels=torch.arange(1, 17)[None]).loss
    loss.backward()
    grads = [p.grad for p in tuned.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_shapes_an_adapter_cannot_take_are_one_line_errors(factorized: Path) -> None:
    model = lowrank_compress.load(factorized)
    names = adapter_targets(model)
    cases = [
        ("gralora", {"rank": 3, "blocks": 2}, "multiple of --blocks"),
        ("gralora", {"rank": 6, "blocks": 3}, "does not split into 3 x 3 blocks"),
        ("c3a", {"block_size": 24}, "does not divide"),
        ("bone", {"rank": 1000}, "exceeds the input width"),
    ]
    for kind, kw, message in cases:
        options = AdapterOptions(**{"rank": 4, **kw})
        with pytest.raises(lowrank_compress.LowrankError, match=message) as e:
            peft_config(kind, model, names, options)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------- finetune


def test_finetune_c3a_keep_merge_writes_the_original_ranks(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    from lowrank_compress.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(data=str(data), adapter="c3a", block_size=16, steps=2, seq_len=64, batch_size=2,
                                eval_tokens=512, lr=5e-3, merge=True, merge_rank="keep")  # fmt: skip
    result = finetune(factorized, tmp_path / "keep", settings)
    original = lowrank_compress.load(factorized)
    reloaded = lowrank_compress.load(tmp_path / "keep")
    rank = {n: m.rank for n, m in original.named_modules() if isinstance(m, LowRankLinear)}
    assert {n: m.rank for n, m in reloaded.named_modules() if isinstance(m, LowRankLinear)} == rank
    assert result.params_after == result.params_before
    assert result.trainable_params == sum(m.in_features * m.out_features // 16 for m in original.modules()
                                          if isinstance(m, LowRankLinear))  # fmt: skip
    assert result.merge["whitened"] and 0 < result.merge["max_relative_error"] < 1
    errors = result.merge["relative_errors"]  # each layer's merge error is recorded
    assert errors.keys() == rank.keys() and max(errors.values()) == result.merge["max_relative_error"]


def test_finetune_c3a_break_even_merge_stores_its_layers_dense_and_reloads_exactly(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """A full-rank update cannot grow the factors, so break-even stores every adapted layer dense: the merged
    output is exact (merged perplexity equals the unmerged one), the other layers stay factorized."""
    from lowrank_compress.finetune import FinetuneSettings, finetune

    settings = FinetuneSettings(data=str(data), adapter="c3a", block_size=16, steps=2, seq_len=64, batch_size=2,
                                eval_tokens=512, lr=5e-3, merge=True, merge_rank="break-even")  # fmt: skip
    result = finetune(factorized, tmp_path / "be", settings)
    original = lowrank_compress.load(factorized)
    adapted = set(result.merge["relative_errors"])
    assert result.merge["dense_layers"] == sorted(adapted) and adapted
    assert (
        set(result.merge["ranks"])
        == {n for n, m in original.named_modules() if isinstance(m, LowRankLinear)} - adapted
    )
    assert result.merge["max_relative_error"] == 0.0
    assert result.perplexity["merged"] == pytest.approx(result.perplexity["after"], rel=1e-4)
    reloaded = lowrank_compress.load(tmp_path / "be")
    assert all(type(reloaded.get_submodule(n)) is nn.Linear for n in adapted)
    assert result.params_after == sum(p.numel() for p in reloaded.parameters())


def test_finetune_bad_adapter_settings_fail_cleanly(factorized: Path, data: Path, tmp_path: Path) -> None:
    from tests.fixtures import tiny_gpt2
    from tests.test_finetune import _fails_cleanly, run

    gpt2 = tiny_gpt2(tmp_path)
    out = tmp_path / "o"
    base = ["--data", data, "--steps", "1", "--seq-len", "64", "--eval-tokens", "0", "-o", out]
    assert (
        "use --merge-rank keep (re-truncated to each layer's rank), --merge-rank break-even"
        in _fails_cleanly(run("finetune", factorized, "--adapter", "c3a", "--merge", *base), out)
    )
    assert "multiple of --blocks" in _fails_cleanly(
        run("finetune", factorized, "--adapter", "gralora", "--rank", "3", *base), out
    )
    assert "does not divide" in _fails_cleanly(
        run("finetune", factorized, "--adapter", "c3a", "--block-size", "24", *base), out
    )
    for kind in ("c3a", "surm"):  # GPT-2's Conv1D: these wrap Linear layers only
        assert "wraps Linear layers only" in _fails_cleanly(
            run("finetune", gpt2, "--adapter", kind, *base), out
        )
    assert "exceeds the rank" in _fails_cleanly(
        run("finetune", factorized, "--adapter", "loldu", "--rank", "40", *base), out
    )
    res = run("finetune", factorized, "--adapter", "nope", *base)
    assert res.exit_code == 2 and not out.exists() and "Traceback" not in res.output


def test_finetune_singlora_adapters_reload_and_equal_the_exact_merge(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """The ramp's step is saved with the adapter: reloaded adapters give the merged model's logits."""
    from peft import PeftModel

    from lowrank_compress.finetune import FinetuneSettings, finetune

    kw = {"data": str(data), "adapter": "singlora", "rank": 4, "steps": 3, "seq_len": 64, "batch_size": 2,
          "eval_tokens": 0, "lr": 5e-3, "warmup": 0.5}  # fmt: skip
    finetune(factorized, tmp_path / "a", FinetuneSettings(**kw))
    finetune(factorized, tmp_path / "m", FinetuneSettings(**kw, merge=True))
    base = lowrank_compress.load(factorized)
    before = logits(base)
    tuned = PeftModel.from_pretrained(base, tmp_path / "a")
    assert float((logits(tuned) - before).abs().max()) > 1e-4
    layer = next(m for m in tuned.modules() if hasattr(m, "singlora_step"))
    assert float(layer.singlora_step["default"]) == 3 and layer.singlora_ramp["default"] == 2
    torch.testing.assert_close(
        logits(lowrank_compress.load(tmp_path / "m")), logits(tuned), rtol=1e-4, atol=1e-4
    )
