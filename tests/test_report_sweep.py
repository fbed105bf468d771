"""`factorize --evaluate`, `report` and `sweep` on tiny models: the files exist and carry report.json's numbers."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from lowrank_compress.cli import cli
from tests.fixtures import tiny_llama

SMALL_CAL = ("--samples", "4", "--seq-len", "64", "--grad-samples", "2")
SMALL_EVAL = ("--max-tokens", "300", "--window", "64", "--stride", "32")


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny model factorized at two budgets with --evaluate (the evaluation uses evaluate's defaults)."""
    root = tmp_path_factory.mktemp("rep")
    src = tiny_llama(root, num_layers=3)
    outs = []
    for budget in ("0.8", "0.5"):
        out = root / f"out-{budget}"
        res = run("factorize", src, "-o", out, "--budget", budget, *SMALL_CAL, "--evaluate")
        assert res.exit_code == 0, res.output
        outs.append(out)
    return src, outs


def test_factorize_evaluate_puts_the_figures_in_report_and_model_card(outputs) -> None:
    src, (out, _) = outputs
    report = json.loads((out / "report.json").read_text())
    ev = report["evaluation"]
    model, base = ev["models"]
    assert (model["role"], model["path"]) == ("model", str(out))
    assert (base["role"], base["path"]) == ("baseline", str(src))
    assert ev["ratios"]["perplexity"] == pytest.approx(model["perplexity"] / base["perplexity"])
    assert ev["ratios"]["params"] == pytest.approx(report["summary"]["kept_fraction_model"])
    card = (out / "README.md").read_text()
    assert "## Quality and speed" in card and f"{model['perplexity']:.3f}" in card
    assert "evaluate" in report["timings_s"]
    # the answer check ran on the built-in set, and the card shows its count and a few answers side by side
    answers = ev["answers"]
    assert answers["source"] == "builtin" and answers["items"] >= 50 and answers["kept"] is not None
    assert (
        "## Answers" in card and f"answers kept {answers['kept']} of {answers['right']['baseline']}" in card
    )
    for i in answers["samples"]:
        assert answers["results"][i]["prompt"] in card
    assert ev["speed"]["cores"] >= 1 and "±" in card


def test_outputs_have_ordinary_permissions(outputs) -> None:
    """Files 0666 and folders 0777 less the umask, as any program writes them (model.safetensors was 0600)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    _, (out, _) = outputs
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == (0o777 if f.is_dir() else 0o666) & ~umask, f


def test_report_opens_with_a_verdict_beside_the_original(outputs, tmp_path: Path) -> None:
    _, (out, _) = outputs
    res = run("report", out, "-o", tmp_path / "v")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "v" / "report.md").read_text()
    r = json.loads((out / "report.json").read_text())
    ev, s = r["evaluation"], r["summary"]
    verdict = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert md.index("## Verdict") < md.index("## Outputs")
    assert f"keeps {s['kept_fraction_model']:.1%} of the parameters" in verdict
    assert f"{ev['ratios']['perplexity']:.2f}x the original's" in verdict
    model, base = ev["models"]
    assert f"| perplexity | {model['perplexity']:.3f} | {base['perplexity']:.3f} |" in verdict
    assert f"| params | {s['total_params_after']:,} | {s['total_params_before']:,} |" in verdict
    a = ev["answers"]
    assert f"it keeps {a['kept']} of the {a['right']['baseline']} answers" in verdict
    decode = ev["ratios"]["decode_tokens_per_s"]
    half = ev["ratios"]["speed_spread"]["decode"] / 2
    assert f"{decode:.2f}x ±{half:.0%}" in verdict
    html = (tmp_path / "v" / "report.html").read_text()
    assert html.index("<h2>Verdict</h2>") < html.index("<table>")


def test_layers_kept_dense_collapse_into_one_row() -> None:
    from lowrank_compress.report import layer_lines

    def layer(i: int, rank: int | None) -> dict:
        return {"module": f"layers.{i}.mlp", "shape": [8, 4], "rank": rank, "params_after": 32 if rank is None else 24,
                "relative_error": 0.0 if rank is None else 0.1}  # fmt: skip

    report = {
        "output": "o",
        "layers": [layer(0, 2), layer(1, None), layer(2, None), layer(3, 2), layer(4, None)],
    }
    rows = [x for x in layer_lines(report) if x.startswith("| ") and "module" not in x]
    assert len(rows) == 3 and "layers.0.mlp" in rows[0] and "layers.3.mlp" in rows[1]
    assert rows[2].startswith("| 3 layers kept dense (layers.1.mlp, layers.2.mlp, layers.4.mlp)")
    assert "| 96 |" in rows[2]  # their params, summed


def test_report_renders_a_finetune_output(tmp_path: Path) -> None:
    """From finetune.json alone: the loss curve, perplexity before / after / merged, answers right before / after
    (scripted: 1 right before, 2 after, 1 kept), and the verdict."""
    from lowrank_compress.answers import AnswerCheck, AnswerItem
    from lowrank_compress.outdir import write_marker

    out = tmp_path / "ft"
    out.mkdir()
    write_marker(out)
    losses = [3.0 - 0.05 * i for i in range(40)]
    data = {
        "settings": {"train": "adapters", "adapter": "lora", "rank": 16, "lr": 1e-3, "batch_size": 4, "seq_len": 256,
                     "grad_accum": 1},
        "model": "fz", "out": str(out), "kind": "lowrank", "data": {"tokens": 12345}, "steps": 40, "losses": losses,
        "perplexity": {"before": 18.235, "after": 10.113, "merged": 10.114}, "trainable_params": 1000,
        "params_before": 100, "params_after": 110, "precision": "bf16", "device": "cpu", "step_seconds": 3.2,
        "tokens_per_s": 320.0, "warnings": ["a warning"],
    }  # fmt: skip
    items = (
        AnswerItem("Capital of France?", ("Paris",)),
        AnswerItem("2 + 2?", ("4",)),
        AnswerItem("Hi?", ("hello",)),
    )
    said = {"model": ["Paris.", "4", "no"], "baseline": ["It is Paris", "5", "no"]}
    data["answers"] = AnswerCheck("builtin", "0" * 64, items, said, True, 32).to_dict()
    (out / "finetune.json").write_text(json.dumps(data))
    res = run("report", out, "--json")
    assert res.exit_code == 0, res.output
    files = {Path(p).name for p in json.loads(res.stdout)["files"]}
    assert files == {"loss.png", "report.md", "report.html"}
    md = (out / "report.md").read_text()
    assert "18.235 -> 10.113 (0.55x)" in md and "| merged | 10.114 |" in md
    assert f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" in md
    assert "answers right 1 -> 2 of 3" in md and "answers kept 1 of 1" in md
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert '<p class="warn"><strong>warning: a warning</strong></p>' in (out / "report.html").read_text()


def test_report_renders_markdown_html_and_plots_with_the_reports_numbers(outputs, tmp_path: Path) -> None:
    _, outs = outputs
    dest = tmp_path / "rep"
    res = run("report", *outs, "-o", dest, "--json")
    assert res.exit_code == 0, res.output
    files = {Path(p).name for p in json.loads(res.stdout)["files"]}
    assert {"report.md", "report.html", "ranks_by_depth.png", "kept_energy.png", "spectra.png",
            "perplexity_vs_size.png"} <= files  # fmt: skip
    md = (dest / "report.md").read_text()
    html = (dest / "report.html").read_text()
    for out in outs:
        r = json.loads((out / "report.json").read_text())
        row = f"{r['summary']['kept_fraction_targets']:.4f}"
        assert row in md and row in html
        assert f"{r['evaluation']['models'][0]['perplexity']:.3f}" in html
    first = json.loads((outs[0] / "report.json").read_text())
    for layer in first["layers"]:
        assert layer["rank"] is None or layer["module"] in html
    # every image is embedded, as a PNG
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == sum(1 for f in files if f.endswith(".png"))
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "<script" not in html and "http" not in html  # self-contained


def test_report_never_writes_over_a_users_folder(outputs, tmp_path: Path) -> None:
    """`report -o DIR` into a folder of the user's (here one holding its own report.md) or onto a file is refused in
    one line and changes nothing; a new folder is marked as a report folder, so a second report replaces the first."""
    _, outs = outputs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my notes\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep\n")
    for dest in (mine, a_file):
        res = run("report", outs[0], "-o", dest)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert "pass a new or empty folder" in res.output
    assert (
        sorted(p.name for p in mine.iterdir()) == ["report.md"]
        and (mine / "report.md").read_text() == "my notes\n"
    )
    assert a_file.read_text() == "keep\n"
    fresh = tmp_path / "fresh"
    for _ in range(2):
        res = run("report", *outs, "-o", fresh)
        assert res.exit_code == 0, res.output
    assert (fresh / "report.md").is_file()


def test_report_of_something_else_is_one_line(tmp_path: Path) -> None:
    res = run("report", tmp_path)
    assert res.exit_code == 1 and "report.json" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_sweep_table_json_plot_and_kept_models(tmp_path: Path) -> None:
    src = tiny_llama(tmp_path)
    out = tmp_path / "sweep"
    res = run(
        "sweep",
        src,
        "--budgets",
        "0.9,0.5",
        "-o",
        out,
        *SMALL_CAL,
        *SMALL_EVAL,
        "--keep-models",
        "--json",
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [p["budget"] for p in data["points"]] == [0.9, 0.5]
    sizes = [p["params"] for p in data["points"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < data["dense"]["params"]
    for p in data["points"]:
        assert abs(p["kept_fraction_targets"] - p["budget"]) <= 0.005
        kept = Path(p["output"])
        report = json.loads((kept / "report.json").read_text())
        assert report["summary"]["total_params_after"] == p["params"]
        assert p["prefill_ratio"] and all(v > 0 for v in p["prefill_ratio"].values())
    assert json.loads((out / "sweep.json").read_text())["points"] == data["points"]
    # answers kept: asked afresh of the dense model and of each kept model, right in both
    from lowrank_compress.answers import check_answers, load_answer_set
    from lowrank_compress.loading import load_model

    answer_set = load_answer_set()
    dense_model, dense_tok, _ = load_model(src)
    dense_right = check_answers({"d": (dense_model, dense_tok)}, answer_set).right["d"]
    assert data["dense"]["answers_right"] == sum(dense_right)
    for p in data["points"]:
        m, t, _ = load_model(p["output"])
        right = check_answers({"m": (m, t)}, answer_set).right["m"]
        assert p["answers_right"] == sum(right)
        assert p["answers_kept"] == sum(a and b for a, b in zip(dense_right, right, strict=True))
        assert isinstance(p["speed_reliable"], bool)
    assert "answers kept" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.5" in (out / "sweep.md").read_text()

    # without --keep-models nothing but the three files remains
    lean = tmp_path / "lean"
    res = run("sweep", src, "--budgets", "0.7", "-o", lean, *SMALL_CAL, *SMALL_EVAL, "--no-speed")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in lean.iterdir()) == [
        ".lowrank-compress",
        "sweep.json",
        "sweep.md",
        "sweep.png",
    ]
    assert "perplexity" in res.stdout


@pytest.mark.parametrize("budgets", ["0.9,1.2", "0.8,0.8", "a,b", ","])
def test_sweep_rejects_bad_budgets(budgets: str, tmp_path: Path) -> None:
    res = run("sweep", tmp_path / "missing", "--budgets", budgets, "-o", tmp_path / "o")
    assert res.exit_code == 1 and "budget" in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_html_loads_in_headless_chromium(outputs, tmp_path: Path) -> None:
    """No console errors and every image decoded: a probe script appended to a copy of the page writes the result
    into the DOM, which --dump-dom prints after load."""
    _, outs = outputs
    run("report", *outs, "-o", tmp_path)
    page = (tmp_path / "report.html").read_text()
    probe = (
        "<script>window.addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.complete||"
        "i.naturalWidth===0).length;document.body.insertAdjacentHTML('beforeend',"
        "`<p id=probe>images=${document.images.length} broken=${bad}</p>`);});</script>"
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe + "</body>"))
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    match = re.search(r"images=(\d+) broken=(\d+)", proc.stdout)
    assert match, proc.stderr[-2000:]
    assert int(match.group(1)) >= 3 and int(match.group(2)) == 0
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
