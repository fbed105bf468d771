"""factorize end to end: the library pipeline and the CLI on tiny random checkpoints, and every bad input.

Expected values come from the original checkpoint and numpy/scipy, never from the pipeline's own helpers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lowrank_compress
from lowrank_compress.cli import PHASE_LINE, cli
from lowrank_compress.loading import load_model
from lowrank_compress.pipeline import factorize_model
from lowrank_compress.recipe import build_settings
from tests.fixtures import load_state_dict, tiny_bert, tiny_gpt2, tiny_llama

FAST = {"samples": 8, "seq_len": 64, "grad_samples": 2}  # tiny models have 256 positions; 512 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": tiny_llama(root),
        "gqa": tiny_llama(root, gqa=True),
        "tied": tiny_llama(root, tied=True),
        "gpt2": tiny_gpt2(root),
        "bert": tiny_bert(root),
    }


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def fingerprint(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def weight_out_in(sd: dict[str, torch.Tensor], name: str, conv1d: bool) -> np.ndarray:
    w = sd[f"{name}.weight"].double().numpy()
    return w.T if conv1d else w


def product(sd: dict[str, torch.Tensor], name: str) -> np.ndarray:
    return sd[f"{name}.up.weight"].double().numpy() @ sd[f"{name}.down.weight"].double().numpy()


def auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if kind == "bert" else AutoModelForCausalLM


def dense_reference(
    kind: str, source: Path, written: dict[str, torch.Tensor], layers: list[dict]
) -> torch.nn.Module:
    """The original model with each factorized weight replaced by up @ down from the written files."""
    model = auto_class(kind).from_pretrained(source).eval()
    for layer in layers:
        if layer["rank"] is None:
            continue
        w = torch.from_numpy(product(written, layer["module"])).float()
        module = model.get_submodule(layer["module"])
        module.weight.data.copy_(w.T if kind == "gpt2" else w)
    return model


def ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 300, (n, length), generator=torch.Generator().manual_seed(7))


def outputs(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids())
    return out.last_hidden_state if kind == "bert" else out.logits


# ------------------------------------------------------------------------------------------------ the math, end to end


def test_svd_writes_each_layers_truncated_svd(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["llama"]
    result = factorize_model(
        src, tmp_path / "out", build_settings(method="svd", policy="uniform", budget=0.6)
    )
    original, written = load_state_dict(src), load_state_dict(tmp_path / "out")
    for layer in result.layers:
        w = weight_out_in(original, layer.name, conv1d=False)
        r = layer.rank
        assert r is not None and r < w.shape[0] * w.shape[1] / sum(w.shape)  # below break-even
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        best = (u[:, :r] * s[:r]) @ vt[:r]
        got = product(written, layer.name)
        assert np.linalg.norm(got - best) <= 1e-5 * np.linalg.norm(best)
        assert layer.relative_error == pytest.approx(np.sqrt((s[r:] ** 2).sum() / (s**2).sum()), rel=1e-6)
    # every tensor that was not factorized is written byte for byte
    factorized = {x.name for x in result.layers}
    for name, t in original.items():
        if name.rsplit(".", 1)[0] not in factorized:
            assert torch.equal(written[name], t), name


def test_whiten_layer_is_the_optimal_truncation_on_the_calibration_inputs(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """W_r = argmin ||(W - W_r) X^T||_F at the written rank: (W L)_r L^-1 with L the Cholesky factor of X^T X."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank_compress.calibration import make_batches
    from lowrank_compress.text import load_text

    src = models["gqa"]
    settings = build_settings(  # SVD-LLM's objective: every output channel alike
        method="whiten", policy="uniform", budget=0.5, self_mix=0.0, error_aware=False, damping=0.0,
        loss_weighted=False, refine_steps=0, **FAST,
    )  # fmt: skip
    result = factorize_model(src, tmp_path / "out", settings)
    name = "model.layers.1.mlp.down_proj"
    # the layer's inputs on the same calibration windows, captured from the dense model by a plain hook
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    batches = make_batches(
        AutoTokenizer.from_pretrained(src),
        load_text("builtin", split="calibration"),
        samples=settings.samples,
        seq_len=settings.seq_len,
        seed=settings.seed,
    )
    seen: list[np.ndarray] = []
    hook = model.get_submodule(name).register_forward_hook(
        lambda m, a, o: seen.append(a[0].detach().double().reshape(-1, a[0].shape[-1]).numpy())
    )
    with torch.no_grad():
        model(input_ids=batches)
    hook.remove()
    x = np.concatenate(seen)
    w = weight_out_in(load_state_dict(src), name, conv1d=False)
    chol = scipy.linalg.cholesky(x.T @ x, lower=True)
    u, s, vt = np.linalg.svd(w @ chol, full_matrices=False)
    r = next(layer.rank for layer in result.layers if layer.name == name)
    best = scipy.linalg.solve_triangular(chol, ((u[:, :r] * s[:r]) @ vt[:r]).T, lower=True, trans="T").T
    got = product(load_state_dict(tmp_path / "out"), name)
    assert np.linalg.norm(got - best) <= 1e-4 * np.linalg.norm(best)
    # its output error on those inputs is the discarded whitened singular values
    err = ((got - w) @ x.T) ** 2
    assert err.sum() == pytest.approx((s[r:] ** 2).sum(), rel=1e-3)


@pytest.mark.parametrize("kind", ["llama", "gqa", "tied", "gpt2", "bert"])
def test_reload_wires_every_factor_and_accounting_is_exact(
    kind: str, models: dict[str, Path], tmp_path: Path
) -> None:
    src, out = models[kind], tmp_path / "out"
    before = fingerprint(src)
    warnings: list[str] = []
    result = factorize_model(src, out, build_settings(budget=0.7, **FAST), warn=warnings.append)
    assert fingerprint(src) == before
    if kind == "bert":  # no language-model loss: the default sensitivity policy falls back, and says so
        assert result.settings.policy == "uniform" and any("uniform" in w for w in warnings)
    else:
        assert result.settings.policy == "sensitivity" and not warnings

    written = load_state_dict(out)
    loaded = auto_class(kind).from_pretrained(out).eval()
    via_library = lowrank_compress.load(out).eval()
    reference = dense_reference(kind, src, written, result.to_dict()["layers"])
    torch.testing.assert_close(outputs(loaded, kind), outputs(reference, kind), rtol=1e-4, atol=1e-5)
    assert torch.equal(outputs(loaded, kind), outputs(via_library, kind))

    # parameter accounting: the report equals the written tensors and the loaded model
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["total_params_after"] == sum(t.numel() for t in written.values())
    assert summary["total_params_after"] == sum(p.numel() for p in loaded.parameters())
    assert summary["total_params_before"] == sum(t.numel() for t in load_state_dict(src).values())
    target_after = 0
    for layer in report["layers"]:
        if layer["rank"] is None:
            target_after += written[f"{layer['module']}.weight"].numel()
        else:
            target_after += sum(written[f"{layer['module']}.{p}.weight"].numel() for p in ("up", "down"))
    assert summary["target_params_after"] == target_after
    assert summary["kept_fraction_targets"] == pytest.approx(0.7, abs=0.005)
    assert result.kept_fraction_model == summary["total_params_after"] / summary["total_params_before"]


def test_sharded_output_reloads_exactly(models: dict[str, Path], tmp_path: Path) -> None:
    src, out = models["llama"], tmp_path / "out"
    factorize_model(src, out, build_settings(method="svd", policy="uniform"), max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    single = tmp_path / "single"
    factorize_model(src, single, build_settings(method="svd", policy="uniform"))
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = AutoModelForCausalLM.from_pretrained(single).eval()
    assert torch.equal(outputs(a, "llama"), outputs(b, "llama"))


@pytest.mark.parametrize("policy", ["uniform", "energy", "stable-rank", "sensitivity"])
@pytest.mark.parametrize("budget", [0.8, 0.4])
def test_every_policy_meets_the_budget_and_keeps_break_even_layers_dense(
    policy: str, budget: float, models: dict[str, Path], tmp_path: Path
) -> None:
    result = factorize_model(
        models["gqa"], tmp_path / "o", build_settings(policy=policy, budget=budget, **FAST)
    )
    assert abs(result.kept_fraction_targets - budget) <= 0.005
    for layer in result.layers:
        m, n = layer.shape
        if layer.rank is not None:
            assert 1 <= layer.rank < m * n / (m + n)
            assert layer.params_after == layer.rank * (m + n)
        else:
            assert layer.params_after == m * n


# ------------------------------------------------------------------------------------------------ the command line


def test_cli_json_files_and_a_reproducible_recipe(models: dict[str, Path], tmp_path: Path) -> None:
    src, out = models["llama"], tmp_path / "out"
    res = run("factorize", src, "-o", out, "--budget", "0.6", "--samples", 4, "--seq-len", 64, "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["summary"]["budget"] == 0.6 and data["settings"]["method"] == "whiten"
    # each phase timed on its own: the loss gradients (for the sensitivity policy and the loss-weighted fit, which
    # reads them: measured first) apart from the statistics pass
    phases = [
        "load",
        "sampling",
        "gradients",
        "calibration",
        "spectra",
        "checkpoint",
        "allocate",
        "factors and write",
    ]
    assert list(data["timings_s"]) == phases and all(v >= 0 for v in data["timings_s"].values())
    for name in (
        "config.json",
        "model.safetensors",
        "recipe.yaml",
        "report.json",
        "README.md",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
        assert name in data["files"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lowrank"
    assert "auto_map" not in config  # no remote code
    assert json.loads((out / "report.json").read_text())["summary"] == data["summary"]
    assert "0.6" in (out / "README.md").read_text()

    again = tmp_path / "again"
    res = run("factorize", src, "-o", again, "--recipe", out / "recipe.yaml")
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((again / "recipe.yaml").read_text()) == yaml.safe_load(
        (out / "recipe.yaml").read_text()
    )
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_flags_override_the_recipe(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: svd\npolicy: uniform\nbudget: 0.5\n")
    res = run(
        "factorize", models["llama"], "-o", tmp_path / "o", "--recipe", recipe, "--budget", "0.7", "--json"
    )
    assert res.exit_code == 0, res.output
    settings = json.loads(res.stdout)["settings"]
    assert (settings["method"], settings["policy"], settings["budget"]) == ("svd", "uniform", 0.7)


def test_shipped_recipes_load() -> None:
    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        settings = build_settings(path)
        assert path.read_text().startswith("#"), f"{path.name} needs a comment saying when to use it"
        assert 0 < settings.budget < 1
    # default.yaml says it is what factorize does with no flags
    assert build_settings(Path(__file__).parent.parent / "recipes" / "default.yaml") == build_settings()


def _fails_cleanly(res, out: Path, codes: tuple[int, ...] = (1,)) -> str:
    assert res.exit_code in codes, res.output
    assert "Traceback" not in res.output
    lines = [x for x in res.stderr.strip().splitlines() if not re.match(PHASE_LINE, x)]  # progress of a log
    if res.exit_code == 2:  # click's usage error: usage lines, then one "Error: ..." line
        lines = [x for x in lines if x.startswith("Error: ")]
    assert len(lines) == 1, res.stderr
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary directory left behind
    return lines[0]


def test_bad_inputs_fail_cleanly_and_touch_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    src = models["llama"]
    before = fingerprint(src)
    out = tmp_path / "out"
    small = ("--samples", 4, "--seq-len", 64)

    for budget in ("0", "1", "1.5", "-0.2"):
        assert "budget" in _fails_cleanly(run("factorize", src, "-o", out, "--budget", budget), out, (1, 2))
    line = _fails_cleanly(run("factorize", src, "-o", out, "--budget", "0.001", "--method", "svd"), out)
    assert "budget" in line
    short = tmp_path / "short.txt"
    short.write_text("Far too little text to calibrate with.")
    assert "calibration text" in _fails_cleanly(
        run("factorize", src, "-o", out, "--calibration", short, *small), out
    )
    assert "no such file" in _fails_cleanly(
        run("factorize", src, "-o", out, "--calibration", tmp_path / "nope.txt"), out
    )
    assert "no such file" in _fails_cleanly(run("factorize", tmp_path / "missing", "-o", out), out)

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("factorize", src, "-o", out, "--method", "svd", "--policy", "uniform")
    assert res.exit_code == 1 and "--overwrite" in res.stderr and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()

    res = run("factorize", src, "-o", src / "compressed", "--method", "svd", "--policy", "uniform")
    assert res.exit_code == 1 and "inside the input" in res.stderr and not (src / "compressed").exists()

    recipe = tmp_path / "bad.yaml"
    recipe.write_text("budget: [0.5\n")
    assert "not valid YAML" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    recipe.write_text("budget: 0.5\nrnak: 3\n")
    assert "unknown key" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    recipe.write_text("budget: lots\n")
    assert "wrong type" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    recipe.write_text("self_mix: 1.5\n")
    assert "self-mix" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    recipe.write_text("grad_source: text\n")
    assert "grad-source" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    recipe.write_text("self_start: eos\n")
    assert "self-start" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    _fails_cleanly(run("factorize", src, "-o", out, "--self-start", "eos"), out, (2,))
    _fails_cleanly(run("factorize", src, "-o", out, "--self-mix", "-0.1"), out, (2,))
    _fails_cleanly(run("factorize", src, "-o", out, "--self-mix", "2"), out, (2,))
    _fails_cleanly(run("factorize", src, "-o", out, "--max-shard-size", "big"), out, (2,))
    for empty in ("0", "0MB", "0.0GB"):  # every tensor would get a shard of its own
        assert "larger than 0" in _fails_cleanly(
            run("factorize", src, "-o", out, "--max-shard-size", empty), out, (2,)
        )
    _fails_cleanly(run("factorize", src, "-o", out, "--method", "qr"), out, (2,))
    recipe.write_text("budget: 0.5\nmethod: svd\nbudget: 0.7\n")  # YAML would keep the last one silently
    line = _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    assert "'budget' is given twice" in line and "line 3" in line
    recipe.write_text("damping: .nan\n")
    assert "finite" in _fails_cleanly(run("factorize", src, "-o", out, "--recipe", recipe), out)
    for flag in ("--damping", "--budget", "--self-mix", "--energy"):  # nan passes every range check
        for value in ("nan", "inf"):
            assert value in _fails_cleanly(run("factorize", src, "-o", out, flag, value), out, (2,))
    assert "empty path" in _fails_cleanly(run("factorize", "", "-o", out), out, (2,))  # an unset "$MODEL"
    # the model's context is 1024 tokens; on GPT-2 a window past it used to hang or raise an IndexError
    line = _fails_cleanly(run("factorize", src, "-o", out, "--seq-len", 1500), out)
    assert "--seq-len 1500 is longer than the model's context of 1024 tokens" in line
    line = _fails_cleanly(run("factorize", models["gpt2"], "-o", out, "--seq-len", 100_000), out)
    assert "--seq-len 100000 is longer than the model's context" in line
    assert fingerprint(src) == before


def test_the_default_window_is_shortened_to_a_short_context(models: dict[str, Path], tmp_path: Path) -> None:
    """The default --seq-len (512) on a model whose context is shorter becomes the context, said in a warning and
    recorded in the recipe; an explicit longer one is refused (above)."""
    out = tmp_path / "out"
    warnings: list[str] = []
    settings = build_settings(budget=0.7, samples=4, grad_samples=1, self_mix=0.0)
    factorize_model(models["gpt2"], out, settings, warn=warnings.append)
    context = json.loads((models["gpt2"] / "config.json").read_text())["n_positions"]
    assert context < 512 and f"using --seq-len {context}" in " ".join(warnings)
    assert yaml.safe_load((out / "recipe.yaml").read_text())["seq_len"] == context


def test_nan_weights_name_the_layer(models: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "nan"
    bad.mkdir()
    for f in models["llama"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    line = _fails_cleanly(run("factorize", bad, "-o", out, "--method", "svd", "--policy", "uniform"), out)
    assert "model.layers.1.mlp.up_proj" in line and "NaN" in line


def test_fisher_needs_a_language_model_head(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    line = _fails_cleanly(
        run("factorize", models["bert"], "-o", out, "--method", "fisher", "--samples", 4, "--seq-len", 64),
        out,
    )
    assert "fisher" in line


@pytest.mark.slow
def test_smollm2_default_factorization_reloads_and_meets_the_budget(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from lowrank_compress.demo import default_model_path

    out = tmp_path / "smol"
    settings = build_settings(samples=4, seq_len=256, grad_samples=2, budget=0.7)
    result = factorize_model(default_model_path(), out, settings)
    assert abs(result.kept_fraction_targets - 0.7) <= 0.005
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert result.total_params_after == sum(p.numel() for p in loaded.parameters())
    again = lowrank_compress.load(out).eval()
    assert torch.equal(outputs(loaded, "llama"), outputs(again, "llama"))
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


def test_small_or_repetitive_calibration_is_warned_about_and_recorded(
    models: dict[str, Path], tmp_path: Path
) -> None:
    src = models["llama"]  # widest input: 128 (down_proj)
    repetitive = tmp_path / "rep.txt"
    repetitive.write_text("the cat sat on the mat. " * 400)
    cases = {
        "good": ({"samples": 8, "seq_len": 64}, []),
        "tiny": ({"samples": 2, "seq_len": 64}, ["only 128 calibration tokens"]),
        "repetitive": ({"samples": 8, "seq_len": 64, "calibration": str(repetitive)}, ["repetitive"]),
    }
    for name, (extra, expected) in cases.items():
        warnings: list[str] = []
        out = tmp_path / name
        settings = build_settings(method="whiten", policy="uniform", self_mix=0.0, **extra)  # the text alone
        result = factorize_model(src, out, settings, warn=warnings.append)
        assert len(warnings) == len(expected), (name, warnings)
        assert all(e in w for e, w in zip(expected, warnings, strict=True))
        assert result.calibration["warnings"] == warnings
        report = json.loads((out / "report.json").read_text())
        assert report["calibration"]["warnings"] == warnings
        assert report["calibration"]["tokens"] == extra["samples"] * extra["seq_len"]
        assert len(report["calibration"]["text_sha256"]) == 64
        card = (out / "README.md").read_text()
        assert ("Calibration warning" in card) == bool(expected)


def test_damping_zero_is_plain_whitening_and_damping_moves_toward_svd(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """On the dense inputs (--no-error-aware), damping 0 is SVD-LLM and heavy damping approaches plain SVD."""
    src = models["llama"]
    common = {
        "method": "whiten",
        "policy": "uniform",
        "budget": 0.5,
        "samples": 8,
        "seq_len": 64,
        "error_aware": False,
    }
    plain = factorize_model(src, tmp_path / "plain", build_settings(damping=0.0, **common))
    heavy = factorize_model(src, tmp_path / "heavy", build_settings(damping=1e2, **common))
    svd = factorize_model(src, tmp_path / "svd", build_settings(**{**common, "method": "svd"}))
    a = load_state_dict(tmp_path / "plain")
    assert [x.rank for x in plain.layers] == [x.rank for x in heavy.layers] == [x.rank for x in svd.layers]
    original = load_state_dict(src)
    heavy_sd, svd_sd = load_state_dict(tmp_path / "heavy"), load_state_dict(tmp_path / "svd")
    for layer in heavy.layers:
        w = weight_out_in(original, layer.name, conv1d=False)
        err_heavy = np.linalg.norm(product(heavy_sd, layer.name) - w)
        err_svd = np.linalg.norm(product(svd_sd, layer.name) - w)
        err_plain = np.linalg.norm(product(a, layer.name) - w)
        assert err_svd <= err_heavy <= err_plain * (1 + 1e-9)
        assert err_heavy <= err_svd * 1.05  # a loading 100x the mean diagonal is nearly plain SVD
    assert yaml.safe_load((tmp_path / "heavy" / "recipe.yaml").read_text())["damping"] == 100.0


def test_loss_weighted_fit_measures_gradients_and_says_where_it_cannot_run(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--loss-weighted needs the loss gradients: with uniform ranks it still runs the backward pass (else nothing
    would weight the fit) and records itself; encoders have no loss and other methods no row weights, so both say
    so in one warning line and fit without."""
    out = tmp_path / "weighted"
    res = run("factorize", models["llama"], "-o", out, "--policy", "uniform", "--self-mix", "0", "--loss-weighted",
              "--samples", "8", "--seq-len", "64", "--grad-samples", "2", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    calibration = json.loads((out / "report.json").read_text())["calibration"]
    assert calibration["loss_weighted"] is True and calibration["parts"]["text"]["grad_samples"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["loss_weighted"] is True
    for model, extra, said in (
        ("bert", [], "has no language-model loss to weight the fit by"),
        ("llama", ["--method", "asvd"], "--loss-weighted is for --method whiten"),
    ):
        res = run("factorize", models[model], "-o", tmp_path / model, "--policy", "uniform", "--loss-weighted",
                  "--self-mix", "0", "--samples", "8", "--seq-len", "64", *extra)  # fmt: skip
        assert res.exit_code == 0, res.output
        assert [x for x in res.stderr.splitlines() if said in x] and "Traceback" not in res.output
        assert (
            json.loads((tmp_path / model / "report.json").read_text())["calibration"]["loss_weighted"]
            is False
        )


def test_loss_weighted_is_the_default_where_it_can_run(models: dict[str, Path], tmp_path: Path) -> None:
    """Unset (or null in a recipe), the loss-weighted fit runs for whiten on a language model and is off, without a
    warning, where it cannot run (an encoder, another method); the resolved settings (what recipe.yaml writes) and
    report.json's calibration record what ran."""
    from lowrank_compress.errors import LowrankError
    from lowrank_compress.pipeline import Prepared

    small = {**FAST, "self_mix": 0.0, "policy": "uniform"}
    null = tmp_path / "null.yaml"
    null.write_text("loss_weighted: null\n")
    for model, extra, expected in (
        ("llama", {}, True),
        ("llama", {"recipe": null}, True),
        ("llama", {"loss_weighted": False}, False),
        ("llama", {"method": "asvd"}, False),
        ("llama", {"method": "svd"}, False),
        ("bert", {}, False),
    ):
        warnings: list[str] = []
        prepared = Prepared.load(models[model], build_settings(**small, **extra), warn=warnings.append)
        assert prepared.settings.loss_weighted is expected, (model, extra)
        calibration = prepared.calibration_info  # (data-free: nothing calibrated, nothing recorded)
        assert calibration.get("loss_weighted", False) is expected
        assert not [w for w in warnings if "weight" in w], warnings
    out = tmp_path / "out"
    (tmp_path / "bad.yaml").write_text("loss_weighted: maybe\n")
    line = _fails_cleanly(
        run("factorize", models["llama"], "-o", out, "--recipe", tmp_path / "bad.yaml"), out
    )
    assert "loss_weighted must be true, false or null" in line, line
    with pytest.raises(LowrankError, match=r"^loss-weighted must be true, false or null \(.*\), got 'yes'$"):
        build_settings(loss_weighted="yes")


def test_refinement_is_the_default_of_the_whiten_fit_and_needs_calibration_windows(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Unset (or null in a recipe), --refine-steps is 8 with the whiten fit, where it was measured, and 0 with the
    other methods; asked of a data-free run (plain SVD without the gradients' policy) it is refused in one line,
    since there are no calibration windows to refine on."""
    from lowrank_compress.pipeline import Prepared

    small = {**FAST, "self_mix": 0.0, "policy": "uniform"}
    null = tmp_path / "null.yaml"
    null.write_text("refine_steps: null\n")
    for extra, expected in (
        ({}, 8),
        ({"recipe": null}, 8),
        ({"refine_steps": 3}, 3),
        ({"refine_steps": 0}, 0),
        ({"method": "asvd"}, 0),
        ({"method": "asvd", "refine_steps": 2}, 2),
        ({"method": "svd"}, 0),
    ):
        prepared = Prepared.load(models["llama"], build_settings(**small, **extra))
        assert prepared.settings.refine_steps == expected, extra
        assert prepared.calibration_info.get("refine_steps", 0) == expected, extra
    out = tmp_path / "out"
    line = _fails_cleanly(
        run(
            "factorize",
            models["llama"],
            "-o",
            out,
            "--method",
            "svd",
            "--policy",
            "uniform",
            "--refine-steps",
            "4",
        ),
        out,
    )
    assert "--refine-steps needs calibration windows" in line and "--policy uniform" in line, line


def test_self_generated_calibration(models: dict[str, Path], tmp_path: Path) -> None:
    settings = build_settings(calibration="self", samples=8, seq_len=64, grad_samples=2, budget=0.6)
    a = factorize_model(models["llama"], tmp_path / "a", settings)
    b = factorize_model(models["llama"], tmp_path / "b", settings)
    assert a.calibration["source"] == "self" and a.calibration["tokens"] == 8 * 64
    assert a.calibration["text_sha256"] == b.calibration["text_sha256"]  # seeded
    sa, sb = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert "sampled from the model itself" in (tmp_path / "a" / "README.md").read_text()
    out = tmp_path / "enc"
    line = _fails_cleanly(
        run("factorize", models["bert"], "-o", out, "--calibration", "self", "--policy", "uniform"), out
    )
    assert "cannot generate" in line


# ------------------------------------------------------------------------------------------------ mixed calibration


def test_self_mix_zero_is_exactly_the_text_calibration(models: dict[str, Path]) -> None:
    """self_mix 0: the windows and statistics are make_batches + collect_stats on the text, nothing sampled."""
    from lowrank_compress.calibration import collect_stats, make_batches
    from lowrank_compress.pipeline import Prepared
    from lowrank_compress.text import load_text

    settings = build_settings(self_mix=0.0, **FAST)
    prepared = Prepared.load(models["llama"], settings, keep_stats=True)
    dense = load_model(models["llama"])[0]
    batches = make_batches(
        prepared.tokenizer, load_text("builtin", split="calibration"), samples=8, seq_len=64, seed=0
    )
    assert list(prepared.calibration_batches) == ["text"]
    assert torch.equal(prepared.calibration_batches["text"], batches)
    names = [t.name for t in prepared.targets]
    expected = collect_stats(dense, batches, names, sensitivity=True, grad_samples=2)
    for n in names:  # the block-by-block passes compute what the whole model computes
        torch.testing.assert_close(prepared.stats[n].gram.double(), expected[n].gram, rtol=1e-6, atol=1e-6)
        assert prepared.stats[n].out_grad_sq == pytest.approx(expected[n].out_grad_sq, rel=1e-5)
        torch.testing.assert_close(
            prepared.stats[n].out_grad_channels, expected[n].out_grad_channels, rtol=1e-5, atol=1e-12
        )
    info = prepared.calibration_info
    assert "sampling" not in prepared.tick.laps
    assert info["parts"]["self"] is None and info["perplexity"] is None and info["self_mix"] == 0.0
    assert info["tokens"] == 8 * 64 and info["grad_samples"] == 2


def test_mixed_calibration_pools_the_text_with_as_many_seeded_self_samples(models: dict[str, Path]) -> None:
    from lowrank_compress.calibration import blend_stats, collect_stats, sample_batches
    from lowrank_compress.pipeline import Prepared

    src = models["llama"]
    settings = build_settings(self_mix=0.25, **FAST)  # 8 text windows + 8 sampled, 2 gradient windows in each
    a, b = Prepared.load(src, settings, keep_stats=True), Prepared.load(src, settings, keep_stats=True)
    dense = load_model(src)[0]
    other = Prepared.load(src, build_settings(self_mix=0.25, seed=1, **FAST))
    text, own = a.calibration_batches["text"], a.calibration_batches["self"]
    assert text.shape == (8, 64) and own.shape == (8, 64)
    bos = a.tokenizer.bos_token_id
    for rows in (text, own):
        assert (rows[:, 0] == bos).all() and not (rows[:, 1:] == bos).any()
    expected_own = sample_batches(dense, a.tokenizer, samples=8, seq_len=64, seed=0, random_start=True)
    assert torch.equal(own, expected_own)
    assert all(torch.equal(a.calibration_batches[k], b.calibration_batches[k]) for k in ("text", "self"))
    assert not torch.equal(own, other.calibration_batches["self"])
    names = [t.name for t in a.targets]
    for n in names:
        assert (
            torch.equal(a.stats[n].gram, b.stats[n].gram) and a.stats[n].out_grad_sq == b.stats[n].out_grad_sq
        )
    # the statistics are the blend of each part's own: a quarter from the samples
    parts = [collect_stats(dense, x, names, sensitivity=True, grad_samples=2) for x in (text, own)]
    expected = blend_stats([(parts[0], 0.75), (parts[1], 0.25)])
    for n in names:
        torch.testing.assert_close(a.stats[n].gram.double(), expected[n].gram, rtol=1e-5, atol=1e-5)
        assert a.stats[n].out_grad_sq == pytest.approx(expected[n].out_grad_sq, rel=1e-5)
        torch.testing.assert_close(  # pooled sums: the Gram is 3:1 text to samples, scaled to all 16 windows
            a.stats[n].gram.double(),
            2 * (0.75 * parts[0][n].gram + 0.25 * parts[1][n].gram),
            rtol=1e-5,
            atol=1e-5,
        )
    info = a.calibration_info
    assert info["self_mix"] == 0.25 and info["self_start"] == "random"
    assert info["tokens"] == 16 * 64 and info["grad_samples"] == 4
    assert info["parts"]["text"]["samples"] == 8 and info["parts"]["self"]["samples"] == 8
    assert info["parts"]["text"]["grad_samples"] == 2 and info["parts"]["self"]["grad_samples"] == 2
    assert info["parts"]["self"]["sha256"] == hashlib.sha256(own.numpy().tobytes()).hexdigest()
    assert info["parts"]["text"]["sha256"] == info["text_sha256"]
    assert set(info["perplexity"]) == {"text", "self"}
    # shorter self-generated windows opened on the bare prefix, gradients from them alone
    c = Prepared.load(
        src, build_settings(self_mix=0.5, self_seq_len=32, self_start="prefix", grad_source="self", **FAST)
    )
    assert c.calibration_batches["text"].shape == (8, 64) and c.calibration_batches["self"].shape == (8, 32)
    assert torch.equal(
        c.calibration_batches["self"], sample_batches(dense, c.tokenizer, samples=8, seq_len=32, seed=0)
    )
    parts = c.calibration_info["parts"]
    assert parts["text"]["grad_samples"] == 0 and parts["self"]["grad_samples"] == 2
    assert c.calibration_info["tokens"] == 8 * 64 + 8 * 32 and c.calibration_info["self_start"] == "prefix"


def test_calibration_far_from_the_models_own_samples_is_warned_about(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """A model with a sharply peaked head predicts its own samples almost surely and real text terribly: the text's
    perplexity is far from its samples', so the set is called narrow; a plain random model sees no difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peaked = tmp_path / "peaked"
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)
    model.save_pretrained(peaked)
    AutoTokenizer.from_pretrained(models["llama"]).save_pretrained(peaked)
    settings = build_settings(self_mix=0.25, policy="uniform", **FAST)
    warnings: list[str] = []
    result = factorize_model(peaked, tmp_path / "out", settings, warn=warnings.append)
    assert len(warnings) == 1 and "less predictable" in warnings[0], warnings
    ppl = result.calibration["perplexity"]
    assert ppl["text"] > 4 * ppl["self"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["perplexity"] == ppl and report["calibration"]["warnings"] == warnings
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Calibration warning" in card and "on its own samples" in card and "self-mix 0.25" in card

    warnings.clear()
    plain = factorize_model(models["llama"], tmp_path / "plain", settings, warn=warnings.append)
    assert not warnings and plain.calibration["perplexity"] is not None


def test_models_that_cannot_generate_calibrate_on_the_text_alone(
    models: dict[str, Path], tmp_path: Path
) -> None:
    warnings: list[str] = []
    settings = build_settings(self_mix=0.5, policy="uniform", **FAST)
    result = factorize_model(models["bert"], tmp_path / "out", settings, warn=warnings.append)
    assert any("cannot generate its own samples" in w for w in warnings)
    assert result.settings.self_mix == 0.0 and result.calibration["parts"]["self"] is None
    res = run("factorize", models["llama"], "-o", tmp_path / "cli", "--self-mix", "0.25", "--self-seq-len", 32,
              "--grad-source", "self", "--self-start", "prefix", *("--samples", 8, "--seq-len", 64, "--grad-samples", 2, "--json"))  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["settings"]["self_mix"] == 0.25 and data["calibration"]["parts"]["self"]["seq_len"] == 32
    recipe = yaml.safe_load((tmp_path / "cli" / "recipe.yaml").read_text())
    assert (recipe["self_mix"], recipe["self_seq_len"], recipe["grad_source"]) == (0.25, 32, "self")
    assert recipe["self_start"] == "prefix" and data["calibration"]["self_start"] == "prefix"


def _chat_copy(src: Path, dest: Path) -> Path:
    """A copy of a tiny model whose tokenizer has a chat template (BOS / EOS written around every turn)."""
    import shutil

    from transformers import AutoTokenizer

    from tests.test_calibration import CHAT_TEMPLATES

    shutil.copytree(src, dest)
    tok = AutoTokenizer.from_pretrained(dest)
    tok.chat_template = CHAT_TEMPLATES["literal"]
    tok.save_pretrained(dest)
    return dest


def test_answer_gradients_are_the_loss_on_the_models_answers_alone(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--grad-source answers: each layer's sensitivity is the mean squared gradient at its output of the next-token
    loss on the answer windows' labelled tokens alone (one loss per window, the mean over its answer tokens), as
    plain autograd on the whole dense model computes it from the same windows; the text and self-generated windows
    measure none. A model without a chat template says so in one warning and takes its gradients from the mix."""
    from lowrank_compress.pipeline import Prepared
    from lowrank_compress.results import find_targets

    src = _chat_copy(models["llama"], tmp_path / "chat")
    # (the loss-weighted fit rescales the sensitivities: off, to read them plain)
    answers = {"grad_source": "answers", "loss_weighted": False}
    settings = build_settings(chat=True, self_mix=0.5, samples=4, seq_len=128, grad_samples=2, **answers)
    prepared = Prepared.load(src, settings)
    assert prepared.answer_windows is not None and not any(prepared.grad_rows.values())
    ids, labels = prepared.answer_windows
    assert ids.shape == (2, 128) and 0 < int((labels != -100).sum()) < ids.numel()
    info = prepared.calibration_info["grad_source"]
    assert info == {"source": "answers", "samples": 2, "answer_tokens": int((labels != -100).sum())}
    model = load_model(src)[0]
    names = [t.name for t in find_targets(model, [], [])]
    sums = dict.fromkeys(names, 0.0)
    positions = 0
    grads: dict[str, torch.Tensor] = {}

    def keep_grad(name: str):
        def hook(_m: torch.nn.Module, _a: object, out: torch.Tensor) -> None:
            out.register_hook(lambda g: grads.__setitem__(name, g))

        return hook

    hooks = [model.get_submodule(n).register_forward_hook(keep_grad(n)) for n in names]
    for r in range(len(ids)):
        logits = model(input_ids=ids[r : r + 1]).logits.float()
        target = labels[r : r + 1, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1][target[0] != -100], target[0][target[0] != -100]
        )
        loss.backward()
        for n in names:
            sums[n] += float(grads[n].double().pow(2).sum())
        positions += ids.shape[1]
    for h in hooks:
        h.remove()
    width = {n: model.get_submodule(n).out_features for n in names}
    got = {c.name: c.sensitivity for c in prepared.candidates}
    for n in names:
        np.testing.assert_allclose(got[n], sums[n] / positions / width[n], rtol=1e-4, err_msg=n)
    notes: list[str] = []
    plain = Prepared.load(models["llama"], dataclasses.replace(settings, chat=None), warn=notes.append)
    assert plain.answer_windows is None and any(plain.grad_rows.values())
    assert plain.settings.grad_source == "mix" and plain.calibration_info["grad_source"] == {"source": "mix"}
    assert [n for n in notes if "--grad-source answers needs a chat model" in n]


def test_chat_calibration_samples_conversations_and_wraps_the_text_only_when_asked(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--chat: the self-generated share opens with a built-in prompt through the template; the text windows stay
    those of `make_batches` unless --chat-text wraps them as turns too. Both reach recipe.yaml, report.json and the
    model card."""
    from lowrank_compress.calibration import make_batches
    from lowrank_compress.pipeline import Prepared
    from lowrank_compress.text import load_text
    from tests.test_calibration import shipped_chat_prompts, template_ids

    src = _chat_copy(models["llama"], tmp_path / "chat")
    settings = build_settings(chat=True, self_mix=0.5, samples=4, seq_len=128, grad_samples=2)
    warnings: list[str] = []
    prepared = Prepared.load(src, settings, warn=warnings.append)
    wrapped = Prepared.load(src, dataclasses.replace(settings, chat_text=True), warn=warnings.append)
    tok = prepared.tokenizer
    assert not any("chat" in w for w in warnings)
    plain = make_batches(
        tok, load_text(settings.calibration, split="calibration"), samples=4, seq_len=128, seed=0
    )
    assert torch.equal(prepared.calibration_batches["text"], plain)
    text, own = wrapped.calibration_batches["text"], prepared.calibration_batches["self"]
    assert text.shape == own.shape == (4, 128)
    assert torch.equal(own, wrapped.calibration_batches["self"])
    for row in text.tolist():
        assert tok.decode(row).startswith(
            "<s>user: Continue this text:\n\n"
        ) and "</s><s>assistant: " in tok.decode(row)
    openings = [template_ids(tok, [{"role": "user", "content": p}], True) for p in shipped_chat_prompts()]
    for row in own.tolist():
        assert sum(row[: len(o)] == o for o in openings) == 1
    info = prepared.calibration_info
    assert info["chat"] is True and info["chat_text"] is False and info["self_start"] is None
    assert wrapped.calibration_info["chat_text"] is True
    # the CLI: --chat and --chat-text reach the settings, recipe.yaml, report.json and the card
    for flag, chat_text, which in (
        ("--no-chat-text", False, "the samples"),
        ("--chat-text", True, "the text and the samples"),
    ):
        out = tmp_path / flag
        res = run("factorize", src, "-o", out, "--chat", flag, "--self-mix", "0.5", "--samples", 4, "--seq-len", 128,
                  "--grad-samples", 2, "--json")  # fmt: skip
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert data["settings"]["chat"] is True and data["calibration"]["chat"] is True
        assert data["settings"]["chat_text"] is chat_text and data["calibration"]["chat_text"] is chat_text
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())
        assert recipe["chat"] is True and recipe["chat_text"] is chat_text
        assert json.loads((out / "report.json").read_text())["calibration"]["chat_text"] is chat_text
        card = (out / "README.md").read_text()
        assert f"; {which} as conversations through the tokenizer's chat template (--chat)" in card


def test_self_answer_tokens_sample_exchanges_from_the_cli_to_the_report(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--self-answer-tokens: the self-generated share is `sample_chat_exchanges`' windows (same seed, same tokens),
    recorded in report.json, recipe.yaml and the model card; a model without a chat template ignores it with a note,
    and a bad value is one clear line."""
    from lowrank_compress.calibration import sample_chat_exchanges
    from lowrank_compress.loading import load_model
    from lowrank_compress.pipeline import Prepared

    src = _chat_copy(models["llama"], tmp_path / "chat")
    small = {"self_mix": 0.5, "samples": 4, "seq_len": 128, "grad_samples": 2}
    prepared = Prepared.load(src, build_settings(self_answer_tokens=16, **small))
    dense, tok, _ = load_model(src)
    expected = sample_chat_exchanges(dense, tok, samples=4, seq_len=128, answer_tokens=16, seed=0)
    assert torch.equal(prepared.calibration_batches["self"], expected)
    assert prepared.calibration_info["self_answer_tokens"] == 16
    out = tmp_path / "out"
    res = run("factorize", src, "-o", out, "--self-answer-tokens", 16, "--self-mix", 0.5, "--samples", 4,
              "--seq-len", 128, "--grad-samples", 2, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["calibration"]["self_answer_tokens"] == 16
    assert yaml.safe_load((out / "recipe.yaml").read_text())["self_answer_tokens"] == 16
    assert "several answers to a window (each at most 16 tokens)" in (out / "README.md").read_text()
    warnings: list[str] = []
    plain = Prepared.load(
        models["llama"], build_settings(self_answer_tokens=16, self_mix=0.25, **FAST), warn=warnings.append
    )
    assert plain.calibration_info["self_answer_tokens"] is None
    assert any("--self-answer-tokens applies to chat calibration only" in w for w in warnings)
    line = _fails_cleanly(
        run("factorize", src, "-o", tmp_path / "bad", "--self-answer-tokens", 0), tmp_path / "bad"
    )
    assert "self-answer-tokens must be at least 1" in line, line


def test_chat_share_samples_that_share_of_conversations_and_the_rest_free_text(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """--chat-share 0.5: half the self-generated windows are conversations (a built-in prompt through the template),
    the other half free text opened as `sample_batches` opens its rows (BOS, then a random ordinary token), sampled
    in one batch; recorded in report.json, recipe.yaml and the card; without a chat template it is ignored with a
    note, and a share outside [0, 1] is one clear line."""
    from lowrank_compress.calibration import (
        _ordinary_tokens,
        _sampling_prefix,
        sample_batches,
        sample_chat_batches,
        sample_chat_exchanges,
    )
    from lowrank_compress.pipeline import Prepared
    from tests.test_calibration import shipped_chat_prompts, template_ids

    src = _chat_copy(models["llama"], tmp_path / "chat")
    small = {"self_mix": 0.5, "samples": 4, "seq_len": 128, "grad_samples": 2}
    prepared = Prepared.load(src, build_settings(chat_share=0.5, **small))
    dense, tok, _ = load_model(src)
    rows = prepared.calibration_batches["self"]
    assert torch.equal(rows, sample_chat_batches(dense, tok, samples=4, seq_len=128, free=2, batch_size=4))
    openings = [template_ids(tok, [{"role": "user", "content": p}], True) for p in shipped_chat_prompts()]
    starts = _ordinary_tokens(dense, tok, 2, 0).tolist()
    for k, row in enumerate(rows.tolist()):
        talk = sum(row[: len(o)] == o for o in openings)
        assert talk == (k < 2), k
        if k >= 2:
            assert row[: len(_sampling_prefix(tok)) + 1] == _sampling_prefix(tok) + [starts[k - 2]]
    info = prepared.calibration_info
    assert info["chat"] is True and info["chat_share"] == 0.5 and info["self_start"] == "random"
    exchanges = Prepared.load(src, build_settings(chat_share=0.5, self_answer_tokens=16, **small))
    talks = sample_chat_exchanges(dense, tok, samples=2, seq_len=128, answer_tokens=16)
    free = sample_batches(dense, tok, samples=2, seq_len=128, random_start=True, batch_size=2)
    assert torch.equal(exchanges.calibration_batches["self"], torch.cat([talks, free]))
    every = Prepared.load(src, build_settings(**small))  # the default: every window a conversation, as before
    assert torch.equal(
        every.calibration_batches["self"], sample_chat_batches(dense, tok, samples=4, seq_len=128)
    )
    assert every.calibration_info["chat_share"] == 1.0 and every.calibration_info["self_start"] is None
    out = tmp_path / "out"
    res = run("factorize", src, "-o", out, "--chat-share", 0.5, "--self-mix", 0.5, "--samples", 4,
              "--seq-len", 128, "--grad-samples", 2, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((out / "report.json").read_text())["calibration"]["chat_share"] == 0.5
    assert yaml.safe_load((out / "recipe.yaml").read_text())["chat_share"] == 0.5
    assert "50% of them conversations and the rest free text" in (out / "README.md").read_text()
    warnings: list[str] = []
    plain = Prepared.load(
        models["llama"], build_settings(chat_share=0.5, self_mix=0.25, **FAST), warn=warnings.append
    )
    assert plain.calibration_info["chat_share"] is None
    assert any("--chat-share applies to chat calibration only" in w for w in warnings)
    bad = tmp_path / "bad"
    line = _fails_cleanly(run("factorize", src, "-o", bad, "--chat-share", 1.5), bad, codes=(2,))
    assert "--chat-share" in line and "1.5" in line, line
    (tmp_path / "bad.yaml").write_text("chat_share: 1.5\n")
    line = _fails_cleanly(run("factorize", src, "-o", bad, "--recipe", tmp_path / "bad.yaml"), bad)
    assert line.endswith("chat-share must be a fraction in [0, 1], got 1.5"), line


def test_chat_without_a_chat_template_keeps_todays_calibration_with_a_note(models: dict[str, Path]) -> None:
    from lowrank_compress.pipeline import Prepared

    src = models["llama"]  # the fixture tokenizer has no chat template
    warnings: list[str] = []
    chat = Prepared.load(
        src, build_settings(chat=True, chat_text=True, self_mix=0.25, **FAST), warn=warnings.append
    )
    plain = Prepared.load(src, build_settings(self_mix=0.25, **FAST))
    notes = [w for w in warnings if "chat" in w]
    assert len(notes) == 2 and "no chat template" in notes[1] and not any("\n" in n for n in notes)
    assert "--chat-text applies to chat calibration only; ignored" in notes[0]
    for part in ("text", "self"):
        assert torch.equal(chat.calibration_batches[part], plain.calibration_batches[part])
    assert chat.calibration_info["chat"] is False and plain.calibration_info["chat"] is False
    assert chat.calibration_info["self_start"] == "random"


def test_chat_bad_recipe_values_are_one_clear_line(models: dict[str, Path], tmp_path: Path) -> None:
    from lowrank_compress.errors import LowrankError

    out = tmp_path / "out"
    for value in ("maybe", "1", "'true'"):
        recipe = tmp_path / "bad.yaml"
        recipe.write_text(f"chat: {value}\n")
        line = _fails_cleanly(run("factorize", models["llama"], "-o", out, "--recipe", recipe), out)
        assert "chat must be true, false or null" in line, line
    with pytest.raises(LowrankError, match=r"^chat must be true, false or null \(.*\), got 'yes'$"):
        build_settings(chat="yes")


def test_chat_is_the_default_for_chat_models_only(models: dict[str, Path], tmp_path: Path) -> None:
    """Unset, chat calibration follows the tokenizer: conversations where it has a chat template (as --chat), plain
    windows and no note where it has none (as --no-chat); --no-chat turns it off for a chat model."""
    from lowrank_compress.pipeline import Prepared

    assert build_settings().chat is None
    src = _chat_copy(models["llama"], tmp_path / "chat")
    small = {"self_mix": 0.5, "samples": 4, "seq_len": 128, "grad_samples": 2}
    auto = Prepared.load(src, build_settings(**small))
    forced = Prepared.load(src, build_settings(chat=True, **small))
    off = Prepared.load(src, build_settings(chat=False, **small))
    assert auto.calibration_info["chat"] is True and off.calibration_info["chat"] is False
    for part in ("text", "self"):
        assert torch.equal(auto.calibration_batches[part], forced.calibration_batches[part])
    assert not torch.equal(auto.calibration_batches["self"], off.calibration_batches["self"])
    assert torch.equal(
        auto.calibration_batches["text"], off.calibration_batches["text"]
    )  # plain unless --chat-text
    warnings: list[str] = []
    base = Prepared.load(models["llama"], build_settings(self_mix=0.25, **FAST), warn=warnings.append)
    plain = Prepared.load(models["llama"], build_settings(chat=False, self_mix=0.25, **FAST))
    assert not any("chat" in w for w in warnings)
    for part in ("text", "self"):
        assert torch.equal(base.calibration_batches[part], plain.calibration_batches[part])
    out = tmp_path / "out"
    res = run("factorize", src, "-o", out, "--no-chat", "--self-mix", "0.5", "--samples", 4, "--seq-len", 128,
              "--grad-samples", 2, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["calibration"]["chat"] is False
    assert yaml.safe_load((out / "recipe.yaml").read_text())["chat"] is False
