"""The training methods the finetune loop calls (lowrank_compress/training/): each test states the paper's equation
it checks and derives the expected values independently (numpy least squares, SVD, brute force)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import lowrank_compress
from lowrank_compress.errors import InterruptedWithCheckpoint, LowrankError
from lowrank_compress.finetune import FinetuneSettings, finetune
from lowrank_compress.modules import LowRankLinear
from lowrank_compress.training import gora, lora_pro, lorae, rank_schedule, trp
from tests.fixtures import tiny_llama, training_text

FAST = {"seq_len": 64, "rank": 4, "eval_tokens": 0, "batch_size": 2, "steps": 4}


@pytest.fixture(scope="module")
def dense_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("dense"))


def assert_reloads_as_merged(
    factorized: Path, data: Path, tmp_path: Path, result: Any, kw: dict[str, Any]
) -> None:
    """The adapter saved in tmp_path/a, loaded by peft onto the factorized model, gives the logits of the same run
    merged into the factors (same losses: the same training)."""
    from peft import PeftModel

    merged = finetune(factorized, tmp_path / "m", settings(data, merge=True, **kw))
    assert merged.losses == pytest.approx(result.losses)
    peft_model = PeftModel.from_pretrained(lowrank_compress.load(factorized), tmp_path / "a")
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        want = lowrank_compress.load(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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


# --------------------------------------------------------------------------------------------------- GoRA


def test_gora_ranks_follow_importance_and_fill_the_budget() -> None:
    """GoRA's allocation: r_l proportional to importance under sum_l r_l (in_l + out_l) = r sum_l (in_l + out_l).
    With equal widths the ranks sum to exactly n r and are ordered like the importances."""
    imp = {"a": 1.0, "b": 3.0, "c": 0.5, "d": 2.5}
    ranks = gora.allocate(imp, dict.fromkeys(imp, 100), rank=8, max_rank=32)
    assert sum(ranks.values()) == 4 * 8
    order = sorted(imp, key=imp.get)
    assert [ranks[n] for n in order] == sorted(ranks.values())
    ideal = {n: 32 * v / sum(imp.values()) for n, v in imp.items()}  # budget share in ranks, brute force
    assert all(abs(ranks[n] - ideal[n]) < 1 for n in imp)


def test_gora_allocation_with_unequal_widths_stays_within_the_budget_and_leaves_no_rank_unspent() -> None:
    imp = {"q": 4.0, "k": 1.0, "up": 2.0, "down": 0.3}
    widths = {"q": 128, "k": 96, "up": 320, "down": 320}
    ranks = gora.allocate(imp, widths, rank=4, max_rank=16)
    budget = 4 * sum(widths.values())
    used = sum(ranks[n] * widths[n] for n in ranks)
    assert used <= budget and all(used + widths[n] > budget or ranks[n] == 16 for n in ranks)
    assert all(1 <= r <= 16 for r in ranks.values())
    capped = gora.allocate(imp, widths, rank=4, max_rank={"q": 5, "k": 16, "up": 16, "down": 16})
    assert capped["q"] == 5 and sum(capped[n] * widths[n] for n in capped) <= 4 * sum(widths.values())


def test_gora_initial_update_is_a_projected_gradient_step() -> None:
    """GoRA's init: B = -(gamma / alpha) G A^+ is the least-squares B for B A = -(gamma / alpha) G (numpy lstsq),
    so s B A = -(gamma / r) G P_A with s = alpha / r: it points along -G (positive inner product)."""
    a, g = rand(3, 10, seed=12), rand(7, 10, seed=13)
    gamma, alpha, r = 16.0, 8.0, 4
    b = gora.initial_b(torch.from_numpy(a), torch.from_numpy(g), gamma, alpha).numpy()
    b_ls = np.linalg.lstsq(a.T, -(gamma / alpha) * g.T, rcond=None)[0].T
    np.testing.assert_allclose(b, b_ls, rtol=1e-9, atol=1e-12)
    update = (alpha / r) * b @ a
    np.testing.assert_allclose(update, -(gamma / r) * g @ np.linalg.pinv(a) @ a, rtol=1e-9, atol=1e-12)
    assert float(np.sum(update * -g)) > 0


def test_gora_gradients_are_the_full_weight_gradients(dense_model_dir: Path, data: Path) -> None:
    """The hooks' sum over tokens of (dL/dy) x^T is dL/dW, compared with autograd on the weights themselves."""
    from accelerate import Accelerator

    from lowrank_compress.loading import load_model
    from lowrank_compress.training.data import pack
    from lowrank_compress.training.loop import Run

    model, tok, _ = load_model(dense_model_dir)
    model.requires_grad_(False)
    rows = pack(tok, training_text(6000), 32)
    run = Run(settings=settings(data), accelerator=Accelerator(cpu=True), model=model, rows=rows, total=1,
              precision="fp32")  # fmt: skip
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    grads = gora.accumulate_gradients(run, names, batches=2)
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    for i in range(2):
        batch = run.batch(i, 0)
        (model(input_ids=batch, labels=batch).loss / 2).backward()
    for n, w in zip(names, weights, strict=True):
        torch.testing.assert_close(grads[n], w.grad, rtol=1e-4, atol=1e-6)


def test_gora_run_saves_its_rank_pattern_and_reloads_with_peft(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    result = finetune(factorized, tmp_path / "g", settings(data, init="gora", init_batches=2, lr=5e-3))
    ranks = result.methods["gora"]["ranks"]
    assert result.methods["gora"]["initialized_layers"] == len(ranks)
    assert result.methods["gora"]["trainable"] <= result.methods["gora"]["plain_lora_trainable"]
    assert result.trainable_params == result.methods["gora"]["trainable"]  # every LoRA parameter counted
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks and len(set(ranks.values())) > 1
    for name, r in ranks.items():  # one scaling s = alpha / r for every layer, as GoRA's fixed scaling
        assert config["alpha_pattern"][name] / r == pytest.approx(config["lora_alpha"] / config["r"])
    plain = finetune(factorized, tmp_path / "p", settings(data, lr=5e-3, steps=1))
    assert result.losses[0] != pytest.approx(plain.losses[0], rel=1e-6)  # GoRA starts one projected step away
    base = lowrank_compress.load(factorized)
    widths = {n: sum(gora.dense_weight(base.get_submodule(n)).shape) for n in ranks}
    assert sum(ranks[n] * widths[n] for n in ranks) <= 4 * sum(widths.values())  # plain LoRA's budget
    weights = load_file(str(tmp_path / "g" / "adapter_model.safetensors"))
    for key, t in weights.items():
        if "lora_B" in key:
            name = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
            assert t.shape[1] == ranks[name]
    merged = finetune(
        factorized, tmp_path / "m", settings(data, init="gora", init_batches=2, lr=5e-3, merge=True)
    )
    peft_model = PeftModel.from_pretrained(base, tmp_path / "g")
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = (
            peft_model(input_ids=ids).logits,
            lowrank_compress.load(tmp_path / "m")(input_ids=ids).logits,
        )
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert merged.losses == pytest.approx(result.losses)


def test_gora_run_resumes_with_its_ranks_and_ends_where_the_uninterrupted_run_does(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """The checkpoint keeps GoRA's ranks (no gradients recomputed on resume; B comes from accelerate's state)."""
    from safetensors.torch import load_file

    kw = {"init": "gora", "init_batches": 2, "steps": 5, "save_every": 2, "lr": 5e-3}
    straight = finetune(factorized, tmp_path / "s", settings(data, **kw))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint):
        finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, stop_after=3)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["methods"]["gora"]["ranks"] == straight.methods["gora"]["ranks"]
    resumed = finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, resume=ckpt)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("s", "r"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- AdaLoRA


@pytest.mark.parametrize("which", ["factorized", "dense"])
def test_adalora_prunes_within_the_budget_and_the_saved_adapter_reproduces_the_merge(
    factorized: Path, dense_model_dir: Path, data: Path, tmp_path: Path, which: str
) -> None:
    """AdaLoRA (peft's allocator, called by the loop): every layer starts at init_r = ceil(1.5 r) triplets and ends
    with at most that, the total at most r per layer (the target budget); pruned triplets hold E = 0, so the saved
    adapter, cut by peft to the surviving triplets, gives the logits of the model merged from every triplet."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = factorized if which == "factorized" else dense_model_dir
    kw = {"rank_schedule": "adalora", "steps": 10, "lr": 5e-3}
    result = finetune(model, tmp_path / "a", settings(data, **kw))
    info = result.methods["adalora"]
    ranks = info["ranks"]
    assert info["init_r"] == 6 and all(0 <= r <= 6 for r in ranks.values())
    assert sum(ranks.values()) <= 4 * len(ranks) < 6 * len(ranks)
    assert info["trainable_end"] < info["trainable_start"] and info["pruned_max_abs_e"] == 0.0
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    for key, t in weights.items():
        if ".lora_E" in key:
            name = key.removeprefix("base_model.model.").split(".lora_E")[0]
            assert t.shape[0] == ranks[name]
    merged = finetune(model, tmp_path / "m", settings(data, merge=True, **kw))
    assert merged.losses == pytest.approx(result.losses)
    load = lowrank_compress.load if which == "factorized" else AutoModelForCausalLM.from_pretrained
    peft_model = PeftModel.from_pretrained(load(model), tmp_path / "a")
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = peft_model(input_ids=ids).logits, load(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["adalora", "elalora", "ard"])
def test_rank_schedules_resume_with_their_allocator_state(
    factorized: Path, data: Path, tmp_path: Path, schedule: str
) -> None:
    """The allocator's smoothed scores and mask pattern travel in accelerate's checkpoint (a registered object)."""
    from safetensors.torch import load_file

    kw = {"rank_schedule": schedule, "steps": 8, "save_every": 2, "lr": 5e-3}
    straight = finetune(factorized, tmp_path / "s", settings(data, **kw))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint):
        finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, stop_after=5)
    resumed = finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, resume=ckpt)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)
    assert resumed.methods[schedule]["ranks"] == straight.methods[schedule]["ranks"]
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("s", "r"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_elastic_step_prunes_the_least_important_and_expands_the_most_important_layers() -> None:
    """ElaLoRA's adjustment: the k globally lowest-scoring active triplets go (brute force: sorted scores), k come
    back in the layers with the highest mean active score, and the total is unchanged."""
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(6, generator=gen) for n in "abcd"}
    scores["d"] = scores["d"] + 10  # the most important layer
    active = {n: torch.tensor([True] * 3 + [False] * 3) for n in "abcd"}
    before = {n: m.clone() for n, m in active.items()}
    pruned, added = rank_schedule.elastic_step(scores, active, k=2)
    ranked = sorted((float(scores[n][i]), n, i) for n in "abcd" for i in range(3))
    assert sorted(pruned) == sorted((n, i) for _, n, i in ranked[:2])
    assert sum(int(m.sum()) for m in active.values()) == 12 and len(added) == 2
    assert added[0][0] == "d" and all(not before[n][i] for n, i in added)  # free slots of the top layers


def test_elalora_keeps_the_total_rank_moves_it_between_layers_and_reloads(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """Every adjustment keeps sum of ranks = r per layer (the budget) with each layer within its pool of 2 r;
    inactive triplets hold E = 0, so the saved adapter (active triplets only) reproduces the merged model."""

    kw = {"rank_schedule": "elalora", "steps": 12, "lr": 5e-3}
    result = finetune(factorized, tmp_path / "a", settings(data, **kw))
    info = result.methods["elalora"]
    ranks, n = info["ranks"], len(info["ranks"])
    assert info["adjustments"] and all(h["total"] == 4 * n for h in info["adjustments"])
    assert sum(ranks.values()) == 4 * n and all(1 <= r <= 8 for r in ranks.values())
    assert set(ranks.values()) != {4} and info["pruned_max_abs_e"] == 0.0
    assert_reloads_as_merged(factorized, data, tmp_path, result, kw)


# --------------------------------------------------------------------------------------------------- ARD-LoRA


def test_ard_rank_gate_budget_and_regularizer() -> None:
    """ARD-LoRA: r = max(1, round(r0 alpha)); the gate is alpha on the first r components (d sum / d alpha = r);
    the budget projection leaves alpha >= 0 and sum r_l <= r0 per layer; the meta-objective's terms are
    lambda sum |alpha_l| + beta sum |alpha_l+1 - alpha_l| over the same projection of consecutive blocks (numpy)."""
    from lowrank_compress.training import ard

    assert [ard.rank_of(torch.tensor(a), 4, 8) for a in (0.0, 0.3, 1.0, 1.4, 9.0)] == [1, 1, 4, 6, 8]
    alpha = torch.tensor(1.3, requires_grad=True)
    g = ard.gate(alpha, 4, 8)
    assert g.tolist() == pytest.approx([1.3] * 5 + [0.0] * 3)
    g.sum().backward()
    assert float(alpha.grad) == 5.0
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.up_proj")]
    assert sorted(ard.tv_pairs(names)) == sorted(
        [(f"model.layers.{i}.{p}", f"model.layers.{i + 1}.{p}") for i in range(2) for p in ("self_attn.q_proj", "mlp.up_proj")]
    )  # fmt: skip
    values = np.array([2.0, -0.5, 1.6, 0.2, 1.9, 1.0])
    alphas = {n: torch.nn.Parameter(torch.tensor(v)) for n, v in zip(names, values, strict=True)}
    method = ard.ArdLora(FinetuneSettings(rank=4, ard_l1=0.1, ard_tv=0.01, rank_schedule="ard"))
    method.alphas = alphas
    by = dict(zip(names, values, strict=True))
    tv = sum(abs(by[f"model.layers.{i}.{p}"] - by[f"model.layers.{i + 1}.{p}"]) for i in range(2)
             for p in ("self_attn.q_proj", "mlp.up_proj"))  # fmt: skip
    assert float(method.regularizer(None).detach()) == pytest.approx(0.1 * np.abs(values).sum() + 0.01 * tv)
    ard.fit_budget(alphas, 4, 8)
    assert all(float(a) >= 0 for a in alphas.values())
    assert sum(ard.rank_of(a, 4, 8) for a in alphas.values()) <= 4 * len(alphas)


def test_ard_fold_keeps_the_layers_output() -> None:
    """Folding alpha and the mask into A (A' = alpha A[:r], B' = B[:, :r]) leaves the gated layer's output as it
    was, with rank r."""
    from peft import LoraConfig, get_peft_model

    from lowrank_compress.training import ard

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 5)), LoraConfig(r=8, target_modules=["0"],
                           init_lora_weights=False))  # fmt: skip
    layer = model.base_model.model[0]
    layer.ard_alpha = torch.nn.Parameter(torch.tensor(0.7))
    method = ard.ArdLora(FinetuneSettings(rank=4, rank_schedule="ard"))
    handle = layer.lora_A["default"].register_forward_hook(method._hook(layer))
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = model(x)
    handle.remove()
    assert ard.fold(layer, 4, 8) == 3 and layer.lora_A["default"].weight.shape == (3, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_ard_run_stays_in_budget_and_its_saved_adapter_reproduces_the_merge(
    factorized: Path, data: Path, tmp_path: Path
) -> None:

    kw = {"rank_schedule": "ard", "steps": 10, "lr": 5e-2, "ard_l1": 1e-2}
    result = finetune(factorized, tmp_path / "a", settings(data, **kw))
    info = result.methods["ard"]
    ranks = info["ranks"]
    assert sum(ranks.values()) <= 4 * len(ranks) and all(1 <= r <= 8 for r in ranks.values())
    assert info["trainable_end"] <= info["trainable_start"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == ranks
    assert_reloads_as_merged(factorized, data, tmp_path, result, kw)


# --------------------------------------------------------------------------------------------------- TRP


def test_factored_nuclear_norm_equals_the_nuclear_norm_at_the_balanced_factors_and_bounds_it_elsewhere() -> (
    None
):
    """TRP's surrogate (||U||_F^2 + ||D||_F^2) / 2 >= ||U D||_*, with equality at U = P S^1/2, D = S^1/2 Q^T
    (numpy SVD); any other factorization U M, M^-1 D of the same product gives more."""
    w = rand(6, 4, seed=14) @ rand(4, 9, seed=15)
    p, sv, qt = np.linalg.svd(w, full_matrices=False)
    nuclear = sv.sum()
    up, down = p[:, :4] * np.sqrt(sv[:4]), np.sqrt(sv[:4])[:, None] * qt[:4]
    value = float(trp.factored_nuclear(torch.from_numpy(up), torch.from_numpy(down)))
    assert value == pytest.approx(nuclear, rel=1e-6)
    for seed in range(5):
        m = rand(4, 4, seed=20 + seed) + 3 * np.eye(4)
        other = float(
            trp.factored_nuclear(torch.from_numpy(up @ m), torch.from_numpy(np.linalg.solve(m, down)))
        )
        assert other >= nuclear * (1 - 1e-6)


def test_energy_rank_is_the_least_rank_holding_the_energy() -> None:
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    for energy in (0.5, 0.7, 0.9, 0.97, 0.99, 0.999, 1.0):
        brute = next(r for r in range(1, 6) if (s[:r] ** 2).sum() >= energy * (s**2).sum() - 1e-12)
        assert trp.energy_rank(torch.from_numpy(s), energy) == brute


def test_truncation_cuts_each_layer_to_the_energy_rule_and_to_its_best_approximation(
    factorized: Path,
) -> None:
    """TRP's truncation: each layer gets the least rank r with sum_{i<r} s_i^2 >= energy sum s_i^2 of its product
    (numpy SVD, brute force), and its new product is the rank-r SVD truncation (Eckart-Young); the optimizer loses
    the state of the replaced factors and holds the new ones."""
    model = lowrank_compress.load(factorized)
    model.requires_grad_(False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    expected, products = {}, {}
    for name, m in layers.items():
        w = (m.up.weight @ m.down.weight).detach().double().numpy()
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        r = next(k for k in range(1, len(s) + 1) if (s[:k] ** 2).sum() >= 0.8 * (s**2).sum())
        if r < m.rank:
            expected[name], products[name] = r, (u[:, :r] * s[:r]) @ vt[:r]
        m.up.weight.requires_grad_(True)
        m.down.weight.requires_grad_(True)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    cut = trp.truncate_by_energy(model, optimizer, 0.8)
    assert cut == expected and cut
    for name, r in cut.items():
        m = model.get_submodule(name)
        assert m.rank == r
        got = (m.up.weight @ m.down.weight).detach().double().numpy()
        np.testing.assert_allclose(got, products[name], rtol=1e-4, atol=1e-5)
    assert set(map(id, optimizer.param_groups[0]["params"])) == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_truncation_during_training_keeps_the_energy_ranks(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """Each cut keeps, per layer, the energy rule's rank of the product at that moment: recomputed here from the
    written factors' spectra for the last cut (the run ends after it without another step changing them: steps =
    truncate_every + 1 leaves one step, so the written ranks are the cut's and no larger than the rule's)."""
    result = finetune(factorized, tmp_path / "t", settings(data, train="factors", truncate_every=2, steps=3,
                                                           truncate_energy=0.8, lr=1e-4))  # fmt: skip
    cuts = result.methods["truncation"]["cuts"]
    assert len(cuts) == 1 and cuts[0]["step"] == 2
    reloaded = lowrank_compress.load(tmp_path / "t")
    for name, m in reloaded.named_modules():
        if isinstance(m, LowRankLinear) and name in cuts[0]["ranks"]:
            assert m.rank == cuts[0]["ranks"][name]
    original = lowrank_compress.load(factorized)
    for (
        name,
        m,
    ) in original.named_modules():  # before training, the rule gives at most what the cut kept + slack
        if isinstance(m, LowRankLinear) and name in cuts[0]["ranks"]:
            s = np.linalg.svd((m.up.weight @ m.down.weight).detach().double().numpy(), compute_uv=False)
            brute = next(r for r in range(1, len(s) + 1) if (s[:r] ** 2).sum() >= 0.8 * (s**2).sum())
            assert abs(cuts[0]["ranks"][name] - brute) <= 1  # two steps at lr 1e-4 barely move the spectrum


# --------------------------------------------------------------------------------------------------- resume


def test_resumed_factor_training_with_truncation_ends_where_the_uninterrupted_run_does(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """Interrupted after a truncation changed the ranks, resumed from accelerate's state: the same final factors."""
    from safetensors.torch import load_file

    kw = {
        "train": "factors",
        "truncate_every": 2,
        "truncate_energy": 0.9,
        "steps": 5,
        "save_every": 2,
        "lr": 1e-3,
    }
    finetune(factorized, tmp_path / "straight", settings(data, **kw))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint):
        finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, stop_after=3)
    assert (ckpt / "optimizer.bin").is_file() and (
        ckpt / "trained.safetensors"
    ).is_file()  # accelerate's files
    finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, resume=ckpt)
    a, b = (
        load_file(str(tmp_path / "straight" / "model.safetensors")),
        load_file(str(tmp_path / "r" / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_the_old_format_is_refused_in_one_line(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"version": 1, "step": 2}))
    (old / "trainable.safetensors").write_bytes(b"")
    with pytest.raises(LowrankError, match="older lowrank-compress"):
        finetune(factorized, tmp_path / "o", settings(data), resume=old)


def test_the_finetune_report_says_what_each_method_did() -> None:
    from lowrank_compress.report_finetune import method_lines

    lines = "\n".join(method_lines({
        "gora": {"ranks": {"a": 2, "b": 6}, "spread": {"min": 2, "max": 6, "mean": 4.0}},
        "adalora": {"ranks": {"a": 3}, "spread": {"min": 3, "max": 3, "mean": 3.0}, "trainable_start": 600,
                    "trainable_end": 300, "orthogonality": 0.25},
        "nuclear": {"weight": 0.1, "last_value": 1.5}, "lora_pro": {"layers": 14}, "adapter_schedule": {},
    }))  # fmt: skip
    assert "| gora | ranks 2 .. 6, mean 4.0 over 2 layers |" in lines
    assert "trainable 600 -> 300; orthogonality 0.25" in lines and "last value 1.5" in lines
    assert "gradients adjusted on 14 layers" in lines and "adapter_schedule" not in lines
    assert method_lines({}) == []


# --------------------------------------------------------------------------------------------------- LoRAE


@pytest.mark.parametrize("case", ["tall", "wide", "square", "rank-deficient", "zero"])
def test_lorae_term_is_the_nuclear_norm_of_the_product_with_its_subgradient(case: str) -> None:
    """LoRAE's term ||M||_* for M = U D: the value is numpy's nuclear norm of the product, and the gradient is the
    subgradient P V^T of ||.||_* (M = P S V^T, directions of nonzero S) carried to the factors by the chain rule:
    dU = P V^T D^T, dD = U^T P V^T. A zero product (LoRA's B at its start) has value 0 and gradient 0."""
    m, r, n = {"tall": (9, 3, 5), "wide": (5, 4, 11), "square": (6, 6, 6)}.get(case, (8, 4, 7))
    up, down = rand(m, r, seed=30), rand(r, n, seed=31)
    if case == "rank-deficient":
        up = rand(m, 2, seed=32) @ rand(2, r, seed=33)
    if case == "zero":
        up = np.zeros((m, r))
    u, d = torch.tensor(up, requires_grad=True), torch.tensor(down, requires_grad=True)
    value = lorae.product_nuclear(u, d)
    value.backward()
    assert u.grad is not None and d.grad is not None
    p, sv, vt = np.linalg.svd(up @ down, full_matrices=False)
    assert float(value.detach()) == pytest.approx(sv.sum(), rel=1e-10, abs=1e-12)
    live = sv > 1e-8 * max(sv.max(), 1e-300)
    g = p[:, live] @ vt[live]
    np.testing.assert_allclose(u.grad.numpy(), g @ down.T, atol=1e-9)
    np.testing.assert_allclose(d.grad.numpy(), up.T @ g, atol=1e-9)


def adapter_nuclear(adapter_dir: Path) -> float:
    """Sum over layers of ||B A||_* of a saved LoRA adapter (numpy SVD of each product)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    total = 0.0
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            total += np.linalg.svd(b.astype(np.float64) @ a, compute_uv=False).sum()
    return total


def test_lorae_regularizer_lowers_the_nuclear_norm_of_the_trained_updates(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """The same run with and without the term: the penalized adapters' summed ||B A||_* ends lower, the term is
    recorded, and the saved adapter still reproduces its merge."""
    kw = {"steps": 6, "lr": 2e-2}
    plain = finetune(factorized, tmp_path / "p", settings(data, **kw))
    reg_kw = {**kw, "low_rank_reg": 0.05}
    reg = finetune(factorized, tmp_path / "a", settings(data, **reg_kw))
    rec = reg.methods["low_rank_reg"]
    assert rec["weight"] == 0.05 and rec["layers"] > 0 and rec["last_value"] > 0
    assert "low_rank_reg" not in plain.methods
    assert adapter_nuclear(tmp_path / "a") < 0.9 * adapter_nuclear(tmp_path / "p")
    assert_reloads_as_merged(factorized, data, tmp_path, reg, reg_kw)


def test_lorae_regularizer_on_trained_factors(factorized: Path, data: Path, tmp_path: Path) -> None:
    """--train factors: the term covers every factorized layer's U D."""
    result = finetune(factorized, tmp_path / "f", settings(data, train="factors", low_rank_reg=1e-3, lr=1e-3))
    model = lowrank_compress.load(factorized)
    layers = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert result.methods["low_rank_reg"]["layers"] == layers > 0


def test_a_checkpoint_written_before_an_option_existed_resumes_with_its_default(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """A checkpoint whose settings lack a key added later (here low_rank_reg) resumes when the option is at its
    default, and ends where the uninterrupted run does."""
    kw = {"steps": 4, "save_every": 2, "lr": 5e-3}
    straight = finetune(factorized, tmp_path / "s", settings(data, **kw))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(InterruptedWithCheckpoint):
        finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, stop_after=2)
    state = json.loads((ckpt / "state.json").read_text())
    del state["settings"]["low_rank_reg"]
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(LowrankError, match=r"other settings \(low_rank_reg\)"):
        finetune(factorized, tmp_path / "q", settings(data, **kw, low_rank_reg=0.1), resume=ckpt)
    resumed = finetune(factorized, tmp_path / "r", settings(data, **kw), checkpoint_dir=ckpt, resume=ckpt)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------------------------------- processes


def test_two_processes_run_gora_and_lora_pro_with_accelerate_checkpoints(
    factorized: Path, data: Path, tmp_path: Path
) -> None:
    """Under torchrun (DDP over gloo): GoRA's gradients averaged over the processes, LoRA-Pro on the synced
    gradients, and a checkpoint after every step written through accelerate's save_state by both processes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lowrank_compress.cli",
           "finetune", str(factorized), "--data", str(data), "-o", str(out), "--steps", "3", "--seq-len", "64",
           "--rank", "2", "--eval-tokens", "0", "--save-every", "1", "--init", "gora", "--init-batches", "2",
           "--optimizer", "lora-pro", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["processes"] == 2 and doc["methods"]["lora_pro"]["layers"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == doc["methods"]["gora"]["ranks"]
    assert not (tmp_path / "ddp.checkpoint").exists()  # written every step, removed at the end


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "lora-pro", "--adapter", "dora"], "--optimizer lora-pro works on LoRA's factors"),
        (["--init", "gora", "--train", "factors"], "--init gora works on LoRA's factors"),
        (["--init", "gora", "--quantize", "nf4"], "drop --quantize nf4"),
        (["--init", "gora", "--init-batches", "0"], "--init-batches must be at least 1"),
        (
            ["--rank-schedule", "adalora", "--adapter", "dora"],
            "--rank-schedule adalora works on LoRA's factors",
        ),
        (["--rank-schedule", "adalora", "--optimizer", "lora-pro"], "does not combine with --optimizer lora-pro"),
        (["--rank-schedule", "elalora", "--init", "gora"], "does not combine with --init gora"),
        (["--rank-schedule", "ard", "--ard-l1", "-1"], "--ard-l1 and --ard-tv must be numbers >= 0"),
        (["--rank-schedule", "ard", "--adapter", "bone"], "--rank-schedule ard works on LoRA's factors"),
        (["--low-rank-reg", "1e-3", "--adapter", "c3a"], "--low-rank-reg penalizes a low-rank product"),
        (["--low-rank-reg", "1e-3", "--rank-schedule", "adalora"], "without --rank-schedule"),
        (["--low-rank-reg", "-1"], "--low-rank-reg must be a number >= 0"),
    ],
)  # fmt: skip
def test_methods_on_the_wrong_adapter_fail_in_one_line(
    factorized: Path, data: Path, tmp_path: Path, flags: list[str], message: str
) -> None:
    from tests.test_finetune import _fails_cleanly, run

    out = tmp_path / "o"
    res = run("finetune", factorized, "--data", data, "--steps", "1", "--seq-len", "64", "-o", out, *flags)
    assert message in _fails_cleanly(res, out)
