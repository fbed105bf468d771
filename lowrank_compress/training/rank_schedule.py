"""Rank schedules: ranks that move during training within a budget.

`adalora` is peft's AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
each layer's update is P diag(E) Q in SVD form, starting at init_r = ceil(1.5 r) triplets per layer (peft's
default ratio, 12 -> 8) with E = 0; the loop calls peft's `update_and_allocate` after every optimizer step, which
scores each triplet by its smoothed sensitivity |w * dL/dw| and its uncertainty, and masks (E_i = 0) the least
important ones until the total is r per layer on average (the budget of plain LoRA at --rank in triplets), along
peft's cubic schedule between tinit (the first tenth of the steps) and the last fifth (tfinal), where the final
pattern is fixed. AdaLoRA's orthogonality regularizer R = mean over P, Q of ||P P^T - I||_F (weight 0.5, peft's
default) is added here, so the recorded loss stays the LM loss. The saved adapter keeps only the triplets that
survived (peft resizes its state by the final rank pattern) and reloads with it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lowrank_compress.errors import LowrankError
from lowrank_compress.training.methods import TrainingMethod, spread

if TYPE_CHECKING:
    from lowrank_compress.recipe import FinetuneSettings
    from lowrank_compress.training.loop import Run

ORTH_WEIGHT = 0.5
START_RATIO = 1.5


def schedule(total: int, rank: int) -> dict[str, int]:
    """peft AdaLoraConfig's schedule for `total` steps (it needs tinit < total - tfinal)."""
    tfinal, tinit = max(1, total // 5), total // 10
    if tinit >= total - tfinal:
        raise LowrankError(f"--rank-schedule adalora needs at least 2 optimizer steps, got {total}")
    return {"init_r": math.ceil(START_RATIO * rank), "target_r": rank, "tinit": tinit, "tfinal": tfinal,
            "deltaT": max(1, total // 20), "total_step": total}  # fmt: skip


class AdaLora(TrainingMethod):
    """`--rank-schedule adalora` (module docstring)."""

    name = "adalora"

    def __init__(self, settings: FinetuneSettings) -> None:
        self.settings = settings
        self.plan: dict[str, int] = {}
        self.last_regularizer: float | None = None

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        self.plan = schedule(run.total, self.settings.rank)
        run.adapter_options["adalora"] = dict(self.plan)

    def _tuner(self, run: Run) -> Any:
        return run.accelerator.unwrap_model(run.model).base_model

    def regularizer(self, run: Run) -> torch.Tensor | None:
        terms = []
        for name, p in run.model.named_parameters():
            if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                cov = p @ p.T if ".lora_A." in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device)))
        if not terms:
            return None
        value = ORTH_WEIGHT * torch.stack(terms).mean()
        self.last_regularizer = float(value.detach())
        return value

    def on_optimizer_step(self, run: Run, step: int) -> None:
        self._tuner(run).update_and_allocate(step)

    def state_dict(self) -> dict[str, Any]:
        """The allocator's smoothed scores and the rank pattern, for accelerate's checkpoints (set by the loop)."""
        alloc = self._run_tuner.rankallocator
        config = self._run_tuner.peft_config[self._run_tuner.trainable_adapter_name]
        return {"ipt": alloc.ipt, "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": config.rank_pattern}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alloc = self._run_tuner.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (
            state["ipt"],
            state["exp_avg_ipt"],
            state["exp_avg_unc"],
        )
        self._run_tuner.peft_config[self._run_tuner.trainable_adapter_name].rank_pattern = state[
            "rank_pattern"
        ]

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        self._run_tuner = self._tuner(run)

    def record(self, run: Run) -> dict[str, Any]:
        tuner = self._tuner(run)
        ranks = final_ranks(tuner)
        return {**self.plan, "ranks": ranks, "spread": spread(ranks), "orthogonality": self.last_regularizer,
                "trainable_start": _params(tuner, False), "trainable_end": _params(tuner, True),
                "pruned_max_abs_e": pruned_weight(tuner)}  # fmt: skip


def final_ranks(tuner: Any) -> dict[str, int]:
    """Triplets kept per layer: the final rank pattern (all init_r where no mask was ever applied)."""
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    out = {}
    for name, module in tuner.model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            key = next((k for k in pattern if k.startswith(f"{name}.lora_E")), None)
            out[name] = int(sum(pattern[key])) if key else int(module.lora_E["default"].shape[0])
    return out


def _params(tuner: Any, final: bool | None) -> int:
    """Trainable parameters of the triplets, r (in + out + 1) per layer, at init_r or at the final ranks."""
    ranks = final_ranks(tuner)
    total = 0
    for name, module in tuner.model.named_modules():
        if name in ranks:
            r = ranks[name] if final else module.lora_E["default"].shape[0]
            total += r * (module.in_features + module.out_features + 1)
    return total


def pruned_weight(tuner: Any) -> float:
    """The largest |E_i| among the triplets the final pattern prunes (0 when pruning left them no weight)."""
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern or {}
    worst = 0.0
    for name, module in tuner.model.named_modules():
        key = (
            next((k for k in pattern if k.startswith(f"{name}.lora_E")), None)
            if hasattr(module, "lora_E")
            else None
        )
        if key:
            pruned = ~torch.tensor(pattern[key], dtype=torch.bool)
            e = module.lora_E["default"].detach().view(-1)
            worst = max(worst, float(e[pruned.to(e.device)].abs().max()) if pruned.any() else 0.0)
    return worst


class Sensitivity:
    """AdaLoRA's smoothed importance of each triplet, which ElaLoRA uses too: per entry I = |w dL/dw|, its EMA
    I_bar (beta1) and the EMA U_bar of |I - I_bar| (beta2), s = I_bar U_bar; a triplet scores s(E_i) plus the mean
    of s over row i of P^T (A) and column i of P (B)."""

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    def update(self, key: str, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        ipt = (p.detach() * p.grad.detach()).abs().float()
        avg = self.avg.get(key, torch.zeros_like(ipt))
        unc = self.unc.get(key, torch.zeros_like(ipt))
        self.avg[key] = self.beta1 * avg + (1 - self.beta1) * ipt
        self.unc[key] = self.beta2 * unc + (1 - self.beta2) * (ipt - self.avg[key]).abs()

    def score(self, key: str) -> torch.Tensor:
        return self.avg[key] * self.unc[key] if key in self.avg else torch.zeros(())

    def triplets(self, name: str) -> torch.Tensor:
        """Scores of one layer's triplets (all zero before the first update)."""
        e = self.score(f"{name}.E").reshape(-1)
        return e + self.score(f"{name}.A").mean(dim=1) + self.score(f"{name}.B").mean(dim=0)

    def reset(self, name: str, i: int) -> None:
        """Forget triplet i (re-initialized by an expansion)."""
        for part, index in (("E", (i,)), ("A", (i,)), ("B", (slice(None), i))):
            for d in (self.avg, self.unc):
                if f"{name}.{part}" in d:
                    d[f"{name}.{part}"][index] = 0.0


def elastic_step(
    scores: dict[str, torch.Tensor], active: dict[str, torch.Tensor], k: int
) -> tuple[list, list]:
    """One ElaLoRA adjustment: prune the k lowest-scoring active triplets over all layers (never a layer's last),
    then add k triplets, one to each of the k layers with the highest mean active score that have a free slot
    (cycling over them when fewer). Returns (pruned, added) as (layer, slot) pairs; `active` is updated in place and
    its total is unchanged."""
    candidates = [
        (float(scores[n][i]), n, i)
        for n, mask in active.items()
        for i in torch.nonzero(mask).view(-1).tolist()
    ]
    candidates.sort()
    pruned = []
    for _, n, i in candidates:
        if len(pruned) == k:
            break
        if int(active[n].sum()) > 1:
            active[n][i] = False
            pruned.append((n, i))
    mean = {n: float(scores[n][m].mean()) if m.any() else 0.0 for n, m in active.items()}
    order = sorted(active, key=lambda n: -mean[n])
    added: list[tuple[str, int]] = []
    while len(added) < len(pruned):
        free = [n for n in order if not bool(active[n].all())]
        for n in free[: len(pruned) - len(added)]:
            slots = [i for i in torch.nonzero(~active[n]).view(-1).tolist() if (n, i) not in pruned]
            slot = slots[0] if slots else int(torch.nonzero(~active[n]).view(-1)[0])
            active[n][slot] = True
            added.append((n, slot))
    return pruned, added


class ElaLora(AdaLora):
    """`--rank-schedule elalora` (ElaLoRA, Chang et al. 2025): AdaLoRA's SVD-form layers with a pool of 2 r
    triplets each, r of them active at the start; after a warm-up (the first tenth of the steps), every deltaT steps
    until the last fifth the k least important active triplets are pruned and k added to the most important layers
    (k = half the number of layers, at least 1), so the total stays r per layer; then the pattern is fixed. Inactive
    triplets hold E = 0 (re-zeroed after every optimizer step); an added one starts at E = 0 with fresh P, Q entries
    (normal, std 0.02, peft's init) and cleared scores and Adam moments. The authors' code was not available here:
    k and the schedule are ours, the importance is AdaLoRA's, which the paper uses."""

    name = "elalora"

    def setup(self, run: Run, saved: dict[str, Any] | None) -> None:
        self.plan = schedule(run.total, self.settings.rank)
        self.plan["init_r"] = 2 * self.settings.rank  # the pool; r active
        run.adapter_options["adalora"] = dict(self.plan)
        self.scores = Sensitivity()
        self.active: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, run: Run, resumed: bool) -> None:
        super().on_train_begin(run, resumed)
        r = self.settings.rank
        for name, module in self._layers(run):
            mask = torch.zeros(module.lora_E["default"].shape[0], dtype=torch.bool)
            mask[:r] = True
            self.active.setdefault(name, mask)
        self._apply(run)
        self.start_params = _params(self._run_tuner, True)

    def _layers(self, run: Run) -> list[tuple[str, Any]]:
        tuner = self._run_tuner
        return [
            (n, m) for n, m in tuner.model.named_modules() if hasattr(m, "lora_E") and "default" in m.lora_E
        ]

    def on_optimizer_step(self, run: Run, step: int) -> None:
        layers = self._layers(run)
        for name, m in layers:
            for part in ("A", "E", "B"):
                self.scores.update(f"{name}.{part}", getattr(m, f"lora_{part}")["default"])
        p = self.plan
        if p["tinit"] <= step < p["total_step"] - p["tfinal"] and (step - p["tinit"]) % p["deltaT"] == 0:
            scores = {n: self.scores.triplets(n) for n, _ in layers}
            pruned, added = elastic_step(scores, self.active, max(1, len(layers) // 2))
            self._reinit(run, dict(layers), added)
            self.history.append({"step": step + 1, "pruned": len(pruned), "added": len(added),
                                 "total": sum(int(m.sum()) for m in self.active.values())})  # fmt: skip
        self._apply(run)

    def _reinit(self, run: Run, layers: dict[str, Any], added: list[tuple[str, int]]) -> None:
        """Fresh P, Q entries for added triplets (E = 0 by _apply), their scores and Adam moments cleared."""
        state = getattr(run.optimizer, "optimizer", run.optimizer).state
        with torch.no_grad():
            for name, i in added:
                m = layers[name]
                a, e, b = (getattr(m, f"lora_{x}")["default"] for x in ("A", "E", "B"))
                a[i].normal_(0.0, 0.02)
                b[:, i].normal_(0.0, 0.02)
                for param, index in ((a, (i,)), (e, (i,)), (b, (slice(None), i))):
                    for v in state.get(param, {}).values():
                        if torch.is_tensor(v) and v.shape == param.shape:
                            v[index] = 0.0
                self.scores.reset(name, i)

    def _apply(self, run: Run) -> None:
        """E = 0 on inactive triplets, and the active pattern as peft's rank_pattern (what the saved adapter keeps)."""
        tuner = self._run_tuner
        pattern = {}
        with torch.no_grad():
            for name, m in self._layers(run):
                mask = self.active[name]
                m.lora_E["default"][~mask.to(m.lora_E["default"].device)] = 0.0
                pattern[f"{name}.lora_E"] = mask.tolist()
        tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = pattern

    def state_dict(self) -> dict[str, Any]:
        return {
            "avg": self.scores.avg,
            "unc": self.scores.unc,
            "active": self.active,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores.avg, self.scores.unc = state["avg"], state["unc"]
        self.active, self.history = state["active"], state["history"]
        self._apply(None)  # type: ignore[arg-type]

    def record(self, run: Run) -> dict[str, Any]:
        return {**super().record(run), "trainable_start": self.start_params, "pool_r": self.plan["init_r"],
                "adjustments": self.history}  # fmt: skip
