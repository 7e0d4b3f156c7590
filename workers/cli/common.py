"""What the ``stllm`` commands share: model options, loading, JSON-lines output and following pool work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from workers.settings import current


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="builtin", help="model name, hub id, or model directory (default: builtin)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="compute dtype; auto = bf16 on GPUs and on CPUs with bf16 units, else fp32",
    )


def load_model_for(args):
    """The model ``--model`` names, ready to serve here (the process tuned for CPU serving first)."""
    from workers.stllm.cpu import CpuServing, tune_process
    from workers.stllm.io import load_model

    s = current()
    tune_process(keep_freed_memory=s.cpu.keep_freed_memory, kernels=s.cpu.kernels)
    cpu = CpuServing(fused_linear=s.cpu.fused_linear, exact_gelu=s.cpu.exact_gelu, kernels=s.cpu.kernels)
    t = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype, cache_dir=s.cache_dir)
    model.inference_weights(cpu)
    logging.info("loaded %s (version %s) in %.1fs", args.model, model.version, time.perf_counter() - t)
    return model


def emit(results, out=sys.stdout) -> int:
    """Results as JSON lines (without the per-window probabilities); returns how many succeeded."""
    ok = 0
    for r in results:
        out.write(r.model_dump_json(exclude={"window_probs", "windows"}) + "\n")
        ok += r.error is None
    out.flush()
    return ok


def progress_bar(total: int, desc: str, unit: str = "video"):
    """A progress bar on stderr and the per-result callback that advances it (counting failures)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=total == 0)
    failed = 0

    def update(result) -> None:
        nonlocal failed
        failed += result.error is not None
        bar.set_postfix(failed=failed)
        bar.update(1)

    return bar, update


def follow_job(job_id: str, total: int, desc: str = "job", unit: str = "video"):
    """Follow a pool job with a progress bar until every task has ended; returns its last JobStatus."""
    from tqdm import tqdm

    from workers.pool import client

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr) as bar:

        def show(st) -> None:
            bar.n = st.done + st.failed
            bar.set_postfix(failed=st.failed, state=st.state)
            bar.refresh()

        return client.wait(job_id, on_progress=show)


def emit_job(job_id: str, total: int) -> int:
    """Follow a pool job, then print its results as JSON lines; non-zero when no video succeeded."""
    from workers.pool import client

    print(f"job {job_id} submitted to {current().broker_url}", file=sys.stderr)
    follow_job(job_id, total)
    results = client.results(job_id)
    for r in results:
        r.pop("window_probs", None)
        r.pop("windows", None)
        sys.stdout.write(json.dumps(r) + "\n")
    return 0 if any(r["error"] is None for r in results) else 1


class RoundProgress:
    """A round's progress as one bar over its training steps, with its other stages written above it."""

    def __init__(self, steps: int):
        from tqdm import tqdm

        self.bar = tqdm(total=steps, desc="round", unit="step", file=sys.stderr)
        self._stage = None

    def __call__(self, stage: str, info: dict) -> None:
        if stage == "train":
            self.bar.n = info.get("step", self.bar.n)
            self.bar.set_postfix(loss=info.get("loss"))
            self.bar.refresh()
        elif stage != self._stage:
            self.bar.write(f"{stage}: {info}", file=sys.stderr)
        self._stage = stage

    def close(self) -> None:
        self.bar.close()
