"""Engine benchmark: single-pass scoring vs ``generate(max_new_tokens=10)`` on the trained tiny checkpoint.

For text-only and image batches at batch sizes 1, 8 and 32, on the same held-out synthetic items in the same
run, it measures model-side items/s (``GuardEngine.run`` on already prepared batches; CPU preparation is the
same for both modes and measured separately) of:
  - score only: the one forward pass that yields P(unsafe) (what a safe item costs);
  - single pass: score + greedy decoding of the codes for rows at/above the threshold (the engine's default);
  - generate: plain greedy generation of the whole answer, max_new_tokens=10 (the reference mode);
and prints the ratios and whether decisions and codes were identical. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_engine.py [--items 64] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from worker.config import load_settings
from worker.dev.tiny_model.build import ensure_tiny_model
from worker.dev.tiny_model.synthetic import synthetic_examples
from worker.dev.tiny_model.train import example_image, example_turns
from worker.engine.engine import GuardEngine, PreparedBatch
from worker.engine.types import GuardRequest, GuardResult


def best_rate(items: int, fn: Callable[[], object], repeats: int) -> float:
    """Items per second of the fastest of ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return items / min(times)


def batches_of(requests: list[GuardRequest], size: int) -> list[list[GuardRequest]]:
    return [requests[i : i + size] for i in range(0, len(requests), size)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64, help="items per (modality, batch size) measurement")
    parser.add_argument("--repeats", type=int, default=3)
    # One intra-op thread by default: on a small shared box more threads make timings swing by 10x.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_dir = ensure_tiny_model(train=True)
    settings = load_settings(model__path=str(model_dir))
    single = GuardEngine.from_settings(settings)
    generate = single.with_mode("generate")
    policy = single.policy_for(None)
    examples = synthetic_examples(args.items * 8, seed=2026, split="heldout")
    requests = [GuardRequest(example_turns(e.event), policy, example_image(e.event)) for e in examples]
    by_modality = {
        "text": [r for r in requests if not r.has_image][: args.items],
        "image": [r for r in requests if r.has_image][: args.items],
    }
    print(
        f"tiny checkpoint: {model_dir} ({single.loaded.parameters:,} parameters, device {single.device}, "
        f"torch threads {torch.get_num_threads()})"
    )
    header = (
        f"{'modality':8} {'batch':>5} {'items':>5} {'unsafe':>6} {'score it/s':>10} {'single it/s':>11} "
        f"{'generate it/s':>13} {'single/gen':>10} {'score/gen':>9}  identical"
    )
    print(header)
    print("-" * len(header))
    for modality, pool in by_modality.items():
        for size in (1, 8, 32):
            chosen = pool[: max(size, min(len(pool), args.items if size > 1 else max(8, args.items // 4)))]
            chunks = batches_of(chosen, size)
            prepared_single: list[PreparedBatch] = [single.prepare(c) for c in chunks]
            prepared_generate: list[PreparedBatch] = [generate.prepare(c) for c in chunks]

            single_results: list = []
            generate_results: list = []

            def run_score(prepared: list[PreparedBatch] = prepared_single) -> None:
                for batch in prepared:
                    single.score_only(batch)

            def run_single(
                prepared: list[PreparedBatch] = prepared_single, out: list = single_results
            ) -> None:
                out[:] = [r for batch in prepared for r in single.run(batch)]

            def run_generate(
                prepared: list[PreparedBatch] = prepared_generate, out: list = generate_results
            ) -> None:
                out[:] = [r for batch in prepared for r in generate.run(batch)]

            n = len(chosen)
            score_rate = best_rate(n, run_score, args.repeats)
            single_rate = best_rate(n, run_single, args.repeats)
            generate_rate = best_rate(n, run_generate, args.repeats)
            identical = all(
                isinstance(a, GuardResult)
                and isinstance(b, GuardResult)
                and (a.unsafe, a.codes) == (b.unsafe, b.codes)
                for a, b in zip(single_results, generate_results)
            )
            unsafe = statistics.mean(
                1.0 if isinstance(r, GuardResult) and r.unsafe else 0.0 for r in single_results
            )
            print(
                f"{modality:8} {size:>5} {n:>5} {unsafe:>6.0%} {score_rate:>10.1f} {single_rate:>11.1f} "
                f"{generate_rate:>13.1f} {single_rate / generate_rate:>9.2f}x {score_rate / generate_rate:>8.2f}x  "
                f"{'yes' if identical else 'NO'}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
