"""Which factorized layers cost the answers: put one group of a factorized model's layers back to the dense model's
weights at a time, and count the built-in answers kept (and the parameters the group's factors had saved).

    python benchmarks/probe_dense_groups.py OUT          # OUT: `lowrank-compress factorize -o OUT` of the built-in SmolLM2
    python benchmarks/probe_dense_groups.py OUT --dense MODEL --groups "mlp late=gate_proj,up_proj@24-;q early=q_proj@0-10"
    python benchmarks/probe_dense_groups.py OUT --out NAME   # writes benchmarks/results/NAME.json

A group is `label=kinds@blocks`: module names ending in one of the comma-separated kinds, in decoder blocks `a-b`
(or `a-`, from block a on); only layers OUT factorized are put back. With the error-aware fit (the default) a layer's
factors are fitted to the inputs the layers before it produce, so putting one group back can lose answers too: the
layers after it were fitted to correct its error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import arg, main_or_help, save

GROUPS = (
    "q late=q_proj@24-;o late=o_proj@24-;mlp late=gate_proj,up_proj@24-;mlp middle=gate_proj,up_proj,down_proj@11-19;"
    "attention early=q_proj,k_proj,o_proj@0-10"
)


def parse_groups(spec: str) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """label -> (module kinds, first block, last block)."""
    groups = {}
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        label, _, rest = item.partition("=")
        kinds, _, blocks = rest.partition("@")
        first, _, last = blocks.partition("-")
        if not label or not kinds or not first.isdigit() or not (last == "" or last.isdigit()):
            raise SystemExit(f"--groups: {item!r} is not label=kind[,kind]@a-b or @a-")
        groups[label.strip()] = (tuple(kinds.split(",")), int(first), int(last) if last else 10**9)
    return groups


def _in_blocks(module: str, first: int, last: int) -> bool:
    """Whether the module sits in a decoder block numbered first..last (its name's first number)."""
    digits = [int(p) for p in module.split(".") if p.isdigit()]
    return bool(digits) and first <= digits[0] <= last


def main() -> None:
    from lowrank_compress.answers import check_answers, load_answer_set
    from lowrank_compress.demo import default_model_path
    from lowrank_compress.loading import load_model

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "")
    if not (out / "report.json").is_file():
        raise SystemExit("give a factorize output folder (with report.json) as the first argument")
    dense_path = arg("--dense", str(default_model_path()))
    groups = parse_groups(arg("--groups", GROUPS))
    factorized = {
        x["module"]: x for x in json.loads((out / "report.json").read_text())["layers"] if x["rank"]
    }
    items = load_answer_set(arg("--answers", "builtin"))
    dense_model, dense_tok, _ = load_model(dense_path)
    dense_right = check_answers({"dense": (dense_model, dense_tok)}, items).right["dense"]
    model, tok, _ = load_model(str(out))
    rows = []
    for label, (kinds, first, last) in {"none": ((), 0, -1), **groups}.items():
        chosen = [n for n in factorized if n.endswith(kinds) and _in_blocks(n, first, last)]
        factors = {n: model.get_submodule(n) for n in chosen}
        try:  # the group's dense layers in, for this check only
            for name in chosen:
                model.set_submodule(name, dense_model.get_submodule(name))
            right = check_answers({"model": (model, tok)}, items).right["model"]
        finally:
            for name, module in factors.items():
                model.set_submodule(name, module)
        kept = sum(d and m for d, m in zip(dense_right, right, strict=True))
        saved = sum(factorized[n]["params_before"] - factorized[n]["params_after"] for n in chosen)
        rows.append({"group": label, "layers": len(chosen), "params_back": saved, "answers_kept": kept})
        print(f"{label:20} {len(chosen):>3} layers back, {saved / 1e6:6.2f}M parameters, answers kept {kept} "
              f"of {sum(dense_right)}", flush=True)  # fmt: skip
    if "--out" in sys.argv:
        print(f"wrote {save(arg('--out', ''), {'factorized': str(out), 'dense': dense_path, 'rows': rows})}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
