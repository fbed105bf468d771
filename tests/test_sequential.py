"""Block-sequential factorize: the streamed passes reproduce the whole-model computation, the error-aware fit is the
least-squares optimum, the writer holds one shard, and memory does not grow with depth.

References come from the whole model loaded by transformers (collect_stats' hooks, one forward and backward over
the full network), numpy least squares and alternating least squares, never from the pipeline's own passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lowrank_compress.allocate import LayerCandidate, allocate
from lowrank_compress.calibration import BlockStatistics, LayerStats, collect_stats, make_batches
from lowrank_compress.errors import LowrankError
from lowrank_compress.factorize import decompose
from lowrank_compress.loading import load_model
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
from lowrank_compress.results import find_targets
from lowrank_compress.spectrum import spectrum_stats
from lowrank_compress.text import load_text
from lowrank_compress.writer import ShardWriter
from tests.fixtures import load_state_dict, tiny_bert, tiny_gguf, tiny_gpt2, tiny_llama

FAST = {"samples": 8, "seq_len": 64, "grad_samples": 2, "self_mix": 0.0}


def reference(src: Path, settings) -> dict[str, tuple[int | None, np.ndarray | None]]:
    """Today's in-memory factorization from the public pieces: the whole model, collect_stats over it, one
    decomposition per layer, the allocator. Returns name -> (rank, up @ down)."""
    model, tok, _ = load_model(src)
    targets = find_targets(model, [], [])
    names = [t.name for t in targets]
    needs_grad = settings.policy == "sensitivity" or settings.method == "fisher"
    stats = {}
    if settings.method != "svd" or needs_grad:
        batches = make_batches(
            tok, load_text("builtin", split="calibration"), samples=settings.samples, seq_len=settings.seq_len,
            seed=settings.seed,
        )  # fmt: skip
        stats = collect_stats(
            model, batches, names, fisher=settings.method == "fisher", sensitivity=needs_grad,
            grad_samples=settings.grad_samples,
        )  # fmt: skip
    cands = [
        LayerCandidate(
            t.name, t.out_features, t.in_features,
            decompose(t.weight(), settings.method, stats.get(t.name), damping=settings.damping),
            stable_rank=spectrum_stats(t.weight(), fast=True, tol=1e-5).stable_rank,
            sensitivity=stats[t.name].out_grad_sq if stats else None,
        )
        for t in targets
    ]  # fmt: skip
    ranks = allocate(cands, settings.budget, settings.policy, energy=settings.energy)
    out = {}
    for c in cands:
        r = ranks[c.name]
        out[c.name] = (r, None if r is None else c.decomposition.reconstruct(r).numpy())
    return out


def product(sd: dict[str, torch.Tensor], name: str) -> np.ndarray:
    return sd[f"{name}.up.weight"].double().numpy() @ sd[f"{name}.down.weight"].double().numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("seq")
    return {
        "llama": tiny_llama(root),
        "gqa-sharded": tiny_llama(root, gqa=True, sharded=True),
        "tied": tiny_llama(root, tied=True),
        "gpt2": tiny_gpt2(root),
        "bert": tiny_bert(root),
        "gguf": tiny_gguf(root),
    }


CASES = [
    ("llama", {"method": "whiten", "policy": "sensitivity"}),
    ("gqa-sharded", {"method": "asvd", "policy": "uniform"}),
    ("tied", {"method": "whiten", "policy": "energy", "energy": 0.8}),
    ("gpt2", {"method": "fisher", "policy": "sensitivity"}),
    ("bert", {"method": "whiten", "policy": "uniform"}),
    ("gguf", {"method": "whiten", "policy": "sensitivity"}),
    ("llama", {"method": "svd", "policy": "stable-rank"}),
]


@pytest.mark.parametrize(("kind", "extra"), CASES, ids=[f"{k}-{e['method']}-{e['policy']}" for k, e in CASES])
def test_streaming_without_error_aware_fit_reproduces_the_whole_model_factorization(
    models: dict[str, Path], tmp_path: Path, kind: str, extra: dict
) -> None:
    # today's in-memory factorization weighted no output channel and refined nothing: those off too
    settings = build_settings(
        budget=0.6, error_aware=False, loss_weighted=False, refine_steps=0, **FAST, **extra
    )
    src = models[kind]
    result = factorize_model(src, tmp_path / "out", settings)
    expected = reference(src, settings)
    written = load_state_dict(tmp_path / "out")
    assert {x.name: x.rank for x in result.layers} == {n: r for n, (r, _) in expected.items()}
    for name, (rank, w) in expected.items():
        if rank is None:
            continue
        got = product(written, name)  # whitening amplifies float32 round-off in the inputs: 1e-3, not 1e-6
        assert np.linalg.norm(got - w) <= 1e-3 * np.linalg.norm(w), name
    # untouched tensors keep their names and bytes (GGUF: its dequantized values)
    if kind != "gguf":
        source = load_state_dict(src)
        for name, t in source.items():
            if name in written:
                assert torch.equal(written[name], t), name


# ------------------------------------------------------------------------------------------------ the closed form


def _objective(w, x, xs, m) -> float:
    return float(np.linalg.norm(w @ x - m @ xs) ** 2)


def _als(w: np.ndarray, x: np.ndarray, xs: np.ndarray, r: int, iters: int = 3000) -> np.ndarray:
    """Brute force: alternating least squares on M = A B for min ||W X - A B X'||_F (columns are tokens)."""
    rng = np.random.default_rng(0)
    y = w @ x
    b = rng.standard_normal((r, x.shape[0]))
    for _ in range(iters):
        a = np.linalg.lstsq((b @ xs).T, y.T, rcond=None)[0].T
        # vec(A B X') = (X'^T kron A) vec(B): solve for B by least squares
        kron = np.kron(xs.T, a)
        b = np.linalg.lstsq(kron, y.reshape(-1, order="F"), rcond=None)[0].reshape(r, -1, order="F")
    return a @ b


def test_error_aware_fit_is_the_least_squares_optimum() -> None:
    """min over rank r of ||W X - M X'||_F (AA-SVD / SVD-LLM V2's anchored objective): the closed form equals
    plain least squares at full rank and alternating least squares at rank r; with X' = X it is SVD-LLM's
    (W L)_r L^-1."""
    rng = np.random.default_rng(1)
    out_f, in_f, n = 6, 5, 40
    w = rng.standard_normal((out_f, in_f))
    x = rng.standard_normal((in_f, n))
    xs = x + 0.3 * rng.standard_normal((in_f, n))  # the shifted inputs behind a compressed prefix
    stats = LayerStats(
        gram=torch.from_numpy(xs @ xs.T), abs_sum=torch.from_numpy(np.abs(xs).sum(1)), n_tokens=n,
        cross=torch.from_numpy(x @ xs.T),
    )  # fmt: skip
    dec = decompose(torch.from_numpy(w), "whiten", stats)
    full = np.linalg.lstsq(xs.T, (w @ x).T, rcond=None)[0].T
    np.testing.assert_allclose(dec.reconstruct(in_f).numpy(), full, rtol=1e-8, atol=1e-8)
    for r in (1, 2, 3):
        ours = dec.reconstruct(r).numpy()
        brute = _als(w, x, xs, r)
        assert _objective(w, x, xs, ours) <= _objective(w, x, xs, brute) * (1 + 1e-6)
        assert _objective(w, x, xs, ours) == pytest.approx(_objective(w, x, xs, brute), rel=1e-4)
    # X' = X: SVD-LLM's truncation, factor for factor
    same = LayerStats(
        torch.from_numpy(x @ x.T), torch.from_numpy(np.abs(x).sum(1)), n, cross=torch.from_numpy(x @ x.T)
    )
    plain = LayerStats(torch.from_numpy(x @ x.T), torch.from_numpy(np.abs(x).sum(1)), n)
    a, b = decompose(torch.from_numpy(w), "whiten", same), decompose(torch.from_numpy(w), "whiten", plain)
    torch.testing.assert_close(a.s, b.s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.reconstruct(2), b.reconstruct(2), rtol=1e-9, atol=1e-9)


def test_a_wide_layer_keeps_w_times_the_cross_term_and_fits_the_same() -> None:
    """For a layer with fewer outputs than inputs (down_proj) the error-aware sums hold W X^T X' (out x in) instead
    of X^T X' (in x in); both give M* L = W (X^T X' + rho I) L^-T, so the same factors."""
    torch.manual_seed(0)
    wide, tall = nn.Linear(12, 4, bias=False).double(), nn.Linear(4, 12, bias=False).double()
    x, xs = torch.randn(2, 30, 12, dtype=torch.float64), torch.randn(2, 30, 12, dtype=torch.float64)
    sums = BlockStatistics({"wide": wide})
    for b in range(2):
        sums.add({"wide": x[b]}, {"wide": xs[b]}, weight=0.5)
    got = sums.stats()["wide"]
    flat, flat_s = x.reshape(-1, 12).numpy(), xs.reshape(-1, 12).numpy()
    w = wide.weight.detach().numpy()
    assert got.cross is None
    np.testing.assert_allclose(got.weighted_cross.numpy(), 0.5 * w @ flat.T @ flat_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.gram.numpy(), 0.5 * flat_s.T @ flat_s, rtol=1e-5, atol=1e-5)
    as_cross = LayerStats(got.gram, got.abs_sum, got.n_tokens, cross=torch.from_numpy(0.5 * flat.T @ flat_s))
    for damping in (0.0, 0.1):
        a = decompose(wide.weight.detach(), "whiten", got, damping=damping)
        b = decompose(wide.weight.detach(), "whiten", as_cross, damping=damping)
        torch.testing.assert_close(a.reconstruct(3), b.reconstruct(3), rtol=1e-5, atol=1e-6)
    tall_sums = BlockStatistics({"tall": tall})
    tall_sums.add({"tall": x[0, :, :4]}, {"tall": xs[0, :, :4]})
    assert tall_sums.stats()["tall"].weighted_cross is None and tall_sums.stats()["tall"].cross is not None


def test_consuming_the_statistics_factorizes_the_same_without_a_copy() -> None:
    """`consume_stats` in float64 (damping under `FLOAT32_DAMPING`): the Gram becomes its own Cholesky factor (no
    working copy) and the factors are the same as from the symmetrized copy; without damping the Gram is left alone
    (a larger ridge may need the original)."""
    torch.manual_seed(0)
    w, x = torch.randn(6, 9, dtype=torch.float64), torch.randn(40, 9, dtype=torch.float64)
    fresh = lambda: LayerStats(x.T @ x, x.abs().sum(0), 40)  # noqa: E731
    damping = 5e-3
    ref = decompose(w, "whiten", fresh(), damping=damping)
    consumed = fresh()
    gram = consumed.gram.clone()
    got = decompose(w, "whiten", consumed, damping=damping, consume_stats=True)
    assert got.u.dtype == torch.float64
    torch.testing.assert_close(got.reconstruct(4), ref.reconstruct(4), rtol=1e-9, atol=1e-9)
    loaded = gram + damping * gram.diagonal().mean() * torch.eye(9, dtype=torch.float64)
    torch.testing.assert_close(consumed.gram, torch.linalg.cholesky(loaded))
    kept = fresh()
    decompose(w, "whiten", kept, damping=0.0, consume_stats=True)
    torch.testing.assert_close(kept.gram, gram)


def test_statistics_for_the_float32_fit_are_summed_in_float32_and_consumed_in_place() -> None:
    """`fit_dtype`: the damped whiten fit runs in float32, so its sums (X'^T X', W X^T X') are kept in float32: equal
    to numpy's float64 sums to float32 round-off, the same optimum of ||W X - M X'||^2 + rho ||W - M||^2 as from
    float64 sums, and factorized where they lie when consumed (an 11008-wide Gram is then 0.5 GB, never 1 + 0.5 GB);
    unconsumed, they are left as they were."""
    from lowrank_compress.factorize import fit_dtype

    assert fit_dtype("whiten", 0.1) == torch.float32 and fit_dtype("whiten", 5e-3) == torch.float64
    assert fit_dtype("asvd", 0.1) == torch.float64
    torch.manual_seed(1)
    wide = nn.Linear(12, 4, bias=False)
    x, xs = torch.randn(3, 40, 12), torch.randn(3, 40, 12)
    sums = {dtype: BlockStatistics({"wide": wide}, dtype) for dtype in (torch.float32, torch.float64)}
    for b in range(3):
        for s in sums.values():
            s.add({"wide": x[b]}, {"wide": xs[b]}, weight=0.5)
    single, double = sums[torch.float32].stats()["wide"], sums[torch.float64].stats()["wide"]
    flat, flat_s = x.reshape(-1, 12).double().numpy(), xs.reshape(-1, 12).double().numpy()
    w = wide.weight.detach().double().numpy()
    assert single.gram.dtype == single.weighted_cross.dtype == torch.float32
    np.testing.assert_allclose(single.gram.numpy(), 0.5 * flat_s.T @ flat_s, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(single.weighted_cross.numpy(), 0.5 * w @ flat.T @ flat_s, rtol=1e-5, atol=1e-4)
    ref = decompose(wide.weight.detach(), "whiten", double, damping=0.1)
    before = single.gram.clone()
    kept = decompose(wide.weight.detach(), "whiten", single, damping=0.1)
    torch.testing.assert_close(single.gram, before, rtol=0, atol=0)
    got = decompose(wide.weight.detach(), "whiten", single, damping=0.1, consume_stats=True)
    for dec in (kept, got):
        assert dec.u.dtype == torch.float32
        torch.testing.assert_close(dec.reconstruct(3), ref.reconstruct(3), rtol=1e-4, atol=1e-5)
    loaded = before.double() + 0.1 * before.double().diagonal().mean() * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(single.gram.double(), torch.linalg.cholesky(loaded), rtol=1e-4, atol=1e-4)


def last_hidden_errors(src: Path, outputs: dict[str, Path]) -> dict[str, float]:
    """||h - h_dense|| of each compressed output's last hidden states on the calibration windows."""
    dense, tok, _ = load_model(src)
    batches = make_batches(tok, load_text("builtin", split="calibration"), samples=8, seq_len=64, seed=0)

    def last_hidden(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batches, output_hidden_states=True).hidden_states[-1]

    target = last_hidden(dense)
    return {k: float((last_hidden(load_model(p)[0]) - target).norm()) for k, p in outputs.items()}


def test_error_aware_default_fits_better_than_dense_inputs_alone(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """The point of the error-aware fit: the compressed model's last hidden states are closer to the dense model's
    on the calibration windows than SVD-LLM's, whose layers never see the errors before them."""
    src = models["llama"]
    common = dict(budget=0.5, method="whiten", policy="uniform", refine_steps=0, **FAST)
    factorize_model(src, tmp_path / "aware", build_settings(error_aware=True, **common))
    factorize_model(src, tmp_path / "plain", build_settings(error_aware=False, **common))
    errors = last_hidden_errors(src, {k: tmp_path / k for k in ("aware", "plain")})
    assert errors["aware"] < errors["plain"]


def _layer_inputs(model: nn.Module, names: list[str], batches: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named layer's inputs over the batches, one row per token (float64), by hooks on the whole model."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, args, _o, n=n: rows[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        )
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=batches)
    for h in hooks:
        h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


@pytest.mark.parametrize("loss_weighted", [False, True])
def test_every_layer_is_fitted_to_the_inputs_it_sees_in_the_compressed_model(
    models: dict[str, Path], tmp_path: Path, loss_weighted: bool
) -> None:
    """Error-aware within the block as across blocks: each factorized layer is the closed-form optimum of AA-SVD's
    anchored objective min ||W X - M X'||^2 + rho ||W - M||^2 at its rank, where X are its inputs in the dense model
    and X' its inputs in the compressed model itself: q/k/v see the compressed prefix, o_proj also the factorized
    q/k/v, down_proj the factorized gate/up. X and X' are gathered from the two whole models by hooks. Loss-weighted,
    both norms weight output row i by the mean squared loss gradient at it, which the whole dense model's autograd
    measures here (collect_stats) where factorize ran a backward pass block by block."""
    from lowrank_compress.modules import LowRankLinear

    src = models["llama"]
    settings = build_settings(
        budget=0.5, method="whiten", policy="uniform", loss_weighted=loss_weighted, refine_steps=0, **FAST
    )
    factorize_model(src, tmp_path / "out", settings)
    dense, tok, _ = load_model(src)
    compressed = load_model(tmp_path / "out")[0]
    batches = make_batches(
        tok, load_text("builtin", split="calibration"), samples=settings.samples, seq_len=settings.seq_len,
        seed=settings.seed,
    )  # fmt: skip
    names = [t.name for t in find_targets(dense, [], [])]
    x, xs = _layer_inputs(dense, names, batches), _layer_inputs(compressed, names, batches)
    rows = dict.fromkeys(names)
    if loss_weighted:
        grads = collect_stats(dense, batches, names, sensitivity=True, grad_samples=settings.grad_samples)
        rows = {n: grads[n].out_grad_channels for n in names}
    fitted = 0
    for name in names:
        m = compressed.get_submodule(name)
        if not isinstance(m, LowRankLinear):
            continue
        a, b = x[name], xs[name]
        stats = LayerStats(b.T @ b, b.abs().sum(0), a.shape[0], cross=a.T @ b)
        w = dense.get_submodule(name).weight.detach().double()
        want = decompose(w, "whiten", stats, damping=settings.damping, row_weights=rows[name]).reconstruct(
            m.rank
        )
        got = m.up.weight.detach().double() @ m.down.weight.detach().double()
        assert float((got - want).norm() / want.norm()) < 1e-3, name
        fitted += 1
    assert fitted == len(names)


def test_loss_weighted_ranks_read_the_loss_estimate_of_each_truncation(models: dict[str, Path]) -> None:
    """With --loss-weighted the allocator reads, for every layer and rank r, the diagonal K-FAC estimate of the
    loss increase sum_i g_i^2 ||((W - W_r) X)_i||^2 (g_i^2 the mean squared loss gradient at output channel i; with
    the damping loading rho I on X^T X): the tail sum_{k>r} s_k^2 of the singular values of D^1/2 W (X^T X +
    rho I)^1/2, D = diag(g^2). Here numpy's eigenvalues of D^1/2 W (X^T X + rho I) W^T D^1/2, with X and g from the
    whole dense model (collect_stats), must equal sensitivity x truncation error of pass 1's candidates up to one
    constant (the pooled Gram's normalization) shared by all layers and ranks."""
    from lowrank_compress.pipeline import Prepared

    src = models["llama"]
    settings = build_settings(budget=0.5, method="whiten", loss_weighted=True, **FAST)
    prepared = Prepared.load(src, settings)
    dense, tok, _ = load_model(src)
    batches = make_batches(
        tok, load_text("builtin", split="calibration"), samples=settings.samples, seq_len=settings.seq_len,
        seed=settings.seed,
    )  # fmt: skip
    names = [c.name for c in prepared.candidates]
    stats = collect_stats(dense, batches, names, sensitivity=True, grad_samples=settings.grad_samples)
    ratios = []
    for cand in prepared.candidates:
        st = stats[cand.name]
        gram = st.gram.double().numpy()
        loaded = gram + settings.damping * np.diag(gram).mean() * np.eye(len(gram))
        root = np.sqrt(st.out_grad_channels.double().numpy())[:, None]
        w = root * dense.get_submodule(cand.name).weight.detach().double().numpy()
        energy = np.sort(np.linalg.eigvalsh(w @ loaded @ w.T))[::-1].clip(min=0)
        tails = np.cumsum(energy[::-1])[::-1][: min(w.shape)]
        assert cand.decomposition is not None and cand.sensitivity is not None
        got = cand.sensitivity * cand.decomposition.truncation_error().numpy()[: len(tails)]
        # the last tails are float32 round-off (the sums' order varies with the thread count)
        kept = tails > 1e-3 * tails[0]
        ratios.append(got[kept] / tails[kept])
    ratios_all = np.concatenate(ratios)
    np.testing.assert_allclose(ratios_all, np.median(ratios_all), rtol=1e-2)  # mean-gradient weights: 10% off


def test_layers_reading_one_input_share_their_sums() -> None:
    """q/k/v (and gate/up) read the same tensor: one Gram and one cross term for the group, not one per layer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64)  # fmt: skip
    block = LlamaForCausalLM(cfg).model.layers[0]
    modules = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    sums = BlockStatistics(modules)
    rotary = LlamaForCausalLM(cfg).model.rotary_emb
    h = torch.randn(2, 5, 32)
    emb = rotary(h, torch.arange(5)[None])
    with torch.no_grad(), sums.record() as seen:
        block(h, position_embeddings=emb)
    sums.add(seen, seen)
    stats = sums.stats()
    assert stats["self_attn.q_proj"].gram is stats["self_attn.k_proj"].gram is stats["self_attn.v_proj"].gram
    assert stats["mlp.gate_proj"].gram is stats["mlp.up_proj"].gram
    assert stats["self_attn.o_proj"].gram is not stats["self_attn.q_proj"].gram
    assert stats["self_attn.q_proj"].cross is stats["self_attn.v_proj"].cross
    assert len({id(st.gram) for st in stats.values()}) == 4


# ------------------------------------------------------------------------------------------------ streaming


def test_writer_holds_no_tensor_and_finalizes_names_and_index(tmp_path: Path) -> None:
    import weakref

    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    writer = ShardWriter(tmp_path, max_shard_size=2500)
    for name in list(tensors):
        t = tensors.pop(name)
        gone = weakref.ref(t)
        writer.add(name, t)
        del t
        assert gone() is None, "the writer kept a reference to a tensor it has written"
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(10)}
    files = writer.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert sorted(set(index["weight_map"].values())) == shards and len(files) == 6
    assert index["metadata"]["total_size"] == 10_000
    for name, t in tensors.items():
        assert torch.equal(load_file(str(tmp_path / index["weight_map"][name]))[name], t)
    assert not list(tmp_path.glob(".shard-*"))


@pytest.mark.parametrize("stop_after", [3, 4, 5, 9])
def test_a_writer_resumed_from_its_state_writes_what_one_writer_would(
    tmp_path: Path, stop_after: int
) -> None:
    """A state taken after 3 tensors, then more written (into the open shard, into shards closed since: 1000-byte
    tensors, 2500-byte shards), then a new writer resumed from the state: the shards equal one writer's, byte for
    byte, whatever was written after the state."""
    tensors = {f"t{i}": torch.full((250,), float(i)) for i in range(10)}
    whole = tmp_path / "whole"
    whole.mkdir()
    one = ShardWriter(whole, max_shard_size=2500)
    for name, t in tensors.items():
        one.add(name, t)
    one.finalize()
    parts, out = tmp_path / "parts", tmp_path / "out"
    parts.mkdir(), out.mkdir()
    first = ShardWriter(parts, max_shard_size=2500)
    for name in list(tensors)[:3]:
        first.add(name, tensors[name])
    state = json.loads(json.dumps(first.state()))
    for name in list(tensors)[3:stop_after]:  # written after the state, then lost in a stop
        first.add(name, tensors[name])
    first._data.flush()
    resumed = ShardWriter.resume(parts, state, max_shard_size=2500)
    for name in list(tensors)[3:]:
        resumed.add(name, tensors[name])
    resumed.finalize(into=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for f in whole.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not list(parts.iterdir())


def test_a_writer_state_naming_a_missing_shard_is_refused(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_size=1500)
    for i in range(3):
        writer.add(f"t{i}", torch.zeros(250))
    state = writer.state()
    next(tmp_path.glob(".shard-00000.safetensors")).unlink()
    with pytest.raises(LowrankError, match="missing"):
        ShardWriter.resume(tmp_path, state, max_shard_size=1500)


def test_an_interrupted_run_leaves_no_output(models: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    from lowrank_compress import pipeline

    calls = []

    def interrupt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = pipeline.Prepared._write_block
    monkeypatch.setattr(pipeline.Prepared, "_write_block", interrupt)
    with pytest.raises(KeyboardInterrupt):
        factorize_model(models["llama"], tmp_path / "out", build_settings(method="svd", policy="uniform"))
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_weights_in_memory_do_not_grow_with_depth(tmp_path: Path, monkeypatch) -> None:
    """At most one block's parameters (and the outer ones) are ever materialized, with 2 layers as with 8."""
    from lowrank_compress.sequential import StreamedModel

    peaks = {}
    original = StreamedModel.load_block

    def counting(self, i):
        block = original(self, i)
        live = sum(p.numel() for p in self.model.parameters() if p.device.type != "meta")
        peaks[self.ckpt.path.name] = max(peaks.get(self.ckpt.path.name, 0), live)
        return block

    monkeypatch.setattr(StreamedModel, "load_block", counting)
    settings = build_settings(budget=0.6, policy="uniform", **FAST)
    for layers in (2, 8):
        src = tiny_llama(tmp_path, num_layers=layers, name=f"deep{layers}")
        factorize_model(src, tmp_path / f"out{layers}", settings)
    assert peaks["deep2"] == peaks["deep8"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_blocks_with_offloaded_hidden_states_match_the_cpu_run(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--device cuda moves one block at a time to the GPU; --offload keeps the hidden states on the CPU. Same ranks,
    factors within float tolerance of the CPU run, and the output reloads on either device."""
    settings = dict(budget=0.6, **FAST)
    cpu = factorize_model(models["llama"], tmp_path / "cpu", build_settings(**settings))
    gpu = factorize_model(
        models["llama"], tmp_path / "gpu", build_settings(device="cuda", offload=True, **settings)
    )
    assert [x.rank for x in cpu.layers] == [x.rank for x in gpu.layers]
    a, b = load_state_dict(tmp_path / "cpu"), load_state_dict(tmp_path / "gpu")
    for layer in cpu.layers:
        if layer.rank is not None:
            w = product(a, layer.name)
            assert np.linalg.norm(product(b, layer.name) - w) <= 1e-3 * np.linalg.norm(w), layer.name


def test_a_target_outside_the_blocks_is_refused_in_one_line(models: dict[str, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lowrank_compress.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["factorize", str(models["llama"]), "-o", str(out), "--target", "lm_head"]
    )
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "outside the repeated blocks" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "fit",
    [
        {"method": "whiten", "policy": "uniform"},
        {"method": "fisher"},
        {"method": "svd", "policy": "sensitivity"},
    ],
)
def test_refinement_brings_the_blocks_closer_to_the_dense_outputs(
    models: dict[str, Path], tmp_path: Path, fit: dict
) -> None:
    """--refine-steps: Adam steps on each block's factors against the dense block's outputs lower the compressed
    model's error on the calibration windows (AA-SVD's block-wise refinement), whichever closed form they start
    from (svd and fisher read no calibration inputs for the fit, yet the refinement runs on the windows)."""
    src = models["llama"]
    common = dict(budget=0.5, **fit, **FAST)
    factorize_model(src, tmp_path / "closed", build_settings(refine_steps=0, **common))
    factorize_model(src, tmp_path / "refined", build_settings(refine_steps=40, refine_from=0.0, **common))
    errors = last_hidden_errors(src, {k: tmp_path / k for k in ("closed", "refined")})
    assert errors["refined"] < errors["closed"]


def test_refinement_from_half_the_depth_keeps_the_earlier_blocks_closed_form(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--refine-from 0.5: the blocks before half the depth keep the closed-form factors of a run without refinement,
    to the bit (nothing before them differs); each later block's factors are refined."""
    src = models["llama"]  # two blocks
    common = dict(budget=0.5, method="whiten", policy="uniform", **FAST)
    factorize_model(src, tmp_path / "closed", build_settings(refine_steps=0, **common))
    factorize_model(src, tmp_path / "late", build_settings(refine_steps=5, refine_from=0.5, **common))
    closed, late = load_state_dict(tmp_path / "closed"), load_state_dict(tmp_path / "late")
    assert closed.keys() == late.keys()
    factors = [k for k in closed if k.endswith((".up.weight", ".down.weight"))]
    by_block = {i: [k for k in factors if f".layers.{i}." in k] for i in (0, 1)}
    assert by_block[0] and by_block[1]
    assert all(torch.equal(closed[k], late[k]) for k in by_block[0])
    assert not any(torch.equal(closed[k], late[k]) for k in by_block[1])
    with pytest.raises(LowrankError, match="refine-from"):
        build_settings(refine_from=1.0)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_a_window_run_alone_gives_its_row_of_the_batch(models: dict[str, Path], kind: str) -> None:
    """The refinement's steps run one window with its own block arguments (masks, positions): the block's output
    must be that window's row of the batch run, whatever the model puts in those arguments."""
    from lowrank_compress.checkpoint import Checkpoint
    from lowrank_compress.sequential import StreamedModel

    streamed = StreamedModel(Checkpoint.open(models[kind]))
    ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    with streamed.outer():
        (batch,) = streamed.capture(ids, 3)
        alone = streamed.capture(ids, 1)
    with streamed.block(1) as block, torch.no_grad():
        together = streamed.run_block(block, batch.hidden, batch)
        for r, window in enumerate(alone):
            out = streamed.run_block(block, batch.hidden[r : r + 1], window)
            torch.testing.assert_close(out, together[r : r + 1], rtol=1e-5, atol=1e-5)


def test_the_parts_take_turns_in_the_windows_refinement_visits() -> None:
    """Consecutive refinement steps alternate the calibration parts (text, self-generated) while both have windows
    left, then the longer part's rest follows; every window appears once."""
    from lowrank_compress.flow import windows_in_turn

    ids = {"text": torch.zeros(3, 4), "self": torch.zeros(1, 4)}
    assert windows_in_turn(ids) == [("text", 0), ("self", 0), ("text", 1), ("text", 2)]


def test_writer_output_is_plain_safetensors_in_every_dtype(tmp_path: Path) -> None:
    """What the streaming writer puts on disk is what safetensors itself reads, dtype for dtype."""
    from safetensors import safe_open

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(), "f64": torch.randn(2, 2).double(),
        "i64": torch.arange(5), "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6)[:, ::2],
    }  # fmt: skip
    writer = ShardWriter(tmp_path)
    for name, t in tensors.items():
        writer.add(name, t)
    assert writer.finalize() == [tmp_path / "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


def test_sampling_falls_back_to_the_stored_half_precision_then_to_streaming(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that does not fit in memory at float32 but does at the bfloat16 its checkpoint stores is sampled
    resident at bfloat16 (said in a warning and in report.json); one that fits at neither is streamed. Fits: the
    weights and the sampling's key/value cache within the memory available less max(a tenth, 1 GiB)."""
    import lowrank_compress.sequential as sequential
    from lowrank_compress.pipeline import Prepared

    src = tiny_llama(tmp_path, dtype=torch.bfloat16)
    settings = build_settings(**{**FAST, "self_mix": 0.5, "samples": 2, "seq_len": 16, "grad_samples": 1})
    n = sum(t.numel() for t in load_state_dict(src).values())
    cache = (
        2 * 16 * 2 * 2 * 4 * 16 * 2
    )  # rows x tokens x layers x (keys, values) x heads x head_dim x 2 bytes
    fits_bf16 = 2**30 + 2 * n + cache  # 4n bytes at float32 do not fit, 2n at bfloat16 with the cache just do
    for free, expected in ((fits_bf16, "resident (bfloat16)"), (fits_bf16 - 1, "streamed")):
        monkeypatch.setattr(sequential, "available_memory", lambda free=free: free)
        warnings: list[str] = []
        prepared = Prepared.load(src, settings, warn=warnings.append)
        assert prepared.calibration_info["self_sampling"] == expected
        assert prepared.calibration_info["self_sampling_peak_mb"] > 0  # the memory the sampling held
        assert prepared.calibration_batches["self"].shape == (2, 16)
        assert any("sampling at bfloat16" in w for w in warnings) == (expected != "streamed")


@pytest.mark.parametrize("gqa", [False, True])
def test_the_sampling_cache_estimate_is_what_generate_holds(tmp_path: Path, gqa: bool) -> None:
    """`kv_cache_bytes` equals the bytes of the key/value cache transformers' generate returns, GQA included."""
    from transformers import AutoModelForCausalLM

    from lowrank_compress.checkpoint import Checkpoint
    from lowrank_compress.sequential import StreamedModel

    src = tiny_llama(tmp_path, gqa=gqa)
    model = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.ones(3, 5, dtype=torch.long)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                         do_sample=False, return_dict_in_generate=True)  # fmt: skip
    held = sum(
        t.numel() * t.element_size()
        for layer in out.past_key_values.layers
        for t in (layer.keys, layer.values)
    )
    streamed = StreamedModel(Checkpoint.open(src))
    assert streamed.kv_cache_bytes(3, 5 + 7 - 1, torch.float32) == held  # the last token is never cached


def test_uniform_ranks_skip_the_spectra_and_the_report_shows_those_pass_2_measured(
    models: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """The uniform policy reads layer shapes only: pass 1 computes no spectrum (singular values only), yet the report
    shows the spectra of the same layers an energy run shows, s / s_max of W for method svd."""
    import lowrank_compress.factorize as factorize

    calls: list[bool] = []
    real = factorize.decompose

    def counted(*args, **kwargs):
        calls.append(bool(kwargs.get("spectrum_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(factorize, "decompose", counted)
    uniform = factorize_model(
        models["llama"], tmp_path / "u", build_settings(budget=0.6, method="svd", policy="uniform")
    )
    assert not any(calls) and len(calls) == sum(x.rank is not None for x in uniform.layers)
    energy = factorize_model(
        models["llama"], tmp_path / "e", build_settings(budget=0.6, method="svd", policy="energy")
    )
    assert any(calls)
    assert uniform.spectra.keys() == energy.spectra.keys() and len(uniform.spectra) == 6
    source = load_state_dict(models["llama"])
    for name, s in uniform.spectra.items():
        exact = np.linalg.svd(source[f"{name}.weight"].double().numpy(), compute_uv=False)
        np.testing.assert_allclose(s, exact / exact[0], atol=1e-4)
        np.testing.assert_allclose(s, energy.spectra[name], atol=1e-4)


def test_the_whole_model_is_held_at_the_dtype_asked_and_read_at_the_working_dtype_after(
    tmp_path: Path,
) -> None:
    """Sampling's whole model at the bfloat16 its checkpoint stores really is bfloat16 (half the bytes of float32:
    a 7B model's 13.5 GB, not 27 GB), and the blocks read afterwards are at the working dtype again."""
    from lowrank_compress.checkpoint import Checkpoint
    from lowrank_compress.sequential import StreamedModel

    src = tiny_llama(tmp_path, dtype=torch.bfloat16)
    streamed = StreamedModel(Checkpoint.open(src))
    assert streamed.dtype == torch.float32
    with streamed.whole(resident=True, dtype=torch.bfloat16) as model:
        params = list(model.parameters())
        assert {p.dtype for p in params} == {torch.bfloat16}
        assert sum(p.numel() * p.element_size() for p in params) == streamed.nbytes(torch.bfloat16)
        stored = load_state_dict(src)
        assert torch.equal(
            model.model.layers[0].mlp.up_proj.weight, stored["model.layers.0.mlp.up_proj.weight"]
        )
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in streamed.model.parameters())
    with streamed.block(0) as block:
        assert {p.dtype for p in block.parameters()} == {torch.float32}
    with streamed.outer():
        assert streamed.model.get_input_embeddings().weight.dtype == torch.float32
