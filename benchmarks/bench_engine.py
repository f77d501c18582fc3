"""Engine benchmark: single-pass scoring vs ``generate(max_new_tokens=10)`` on the trained tiny checkpoint.

For text-only and image batches at batch sizes 1, 8 and 32, on the same held-out synthetic items in the same
run, it measures model-side items/s (``GuardEngine.run`` on already prepared batches; CPU preparation is the
same for both modes and measured separately) of:
  - score only: the one forward pass that yields P(unsafe) (what a safe item costs);
  - single pass: score + greedy decoding of the codes for rows at/above the threshold (the engine's default);
  - generate: plain greedy generation of the whole answer, max_new_tokens=10 (the reference mode);
and prints the ratios and whether decisions and codes were identical. Then, for Llama Guard 3 Vision with the
reference cross-attention masking (the default):
  - image prompt start shared: image batches with ``model.share_prompt_prefix`` on vs off (the tokens before
    ``<|image|>`` computed once); it prints how many tokens of an image prompt that is;
  - mixed vs split modalities: the same arrivals (text and image items interleaved as the synthetic set has
    them) cut into windows of N items; each window as one mixed batch vs as its text part and its image part
    (two batches, what a batcher that splits by modality runs);
with items/s, ratios and whether the results were identical. Prints figures; asserts nothing. Timings on a
shared machine are noisy: compare ratios within one run.

    .venv/bin/python benchmarks/bench_engine.py [--items 64] [--repeats 3] [--threads 1] [--skip-modes]
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
    parser.add_argument(
        "--skip-modes",
        action="store_true",
        help="skip single pass vs generate; only the Vision batching figures",
    )
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
    for modality, pool in by_modality.items() if not args.skip_modes else ():
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
    # Alternating candidates, more repeats: these ratios are small and the machine may be shared.
    if single.shares_image_prefix:
        image_prefix_sharing(single, by_modality["image"], max(5, args.repeats))
    if single.mixes_modalities:
        mixed_vs_split(single, requests[: args.items * 2], max(5, args.repeats))
    return 0


def same_results(a: list, b: list) -> bool:
    """Same decisions and codes, scores within fp32 noise."""
    return len(a) == len(b) and all(
        isinstance(x, GuardResult)
        and isinstance(y, GuardResult)
        and (x.unsafe, x.codes) == (y.unsafe, y.codes)
        and abs(x.score - y.score) <= 1e-5
        for x, y in zip(a, b)
    )


def interleaved_rates(items: int, runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Items/s of the fastest run of each candidate, the candidates alternating (a busy machine drifts)."""
    for fn in runs.values():
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for label, fn in runs.items():
            started = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - started)
    return {label: items / seconds for label, seconds in best.items()}


def run_all(engine: GuardEngine, batches: list[PreparedBatch]) -> list:
    return [r for batch in batches for r in engine.run(batch)]


def image_prefix_sharing(engine: GuardEngine, pool: list[GuardRequest], repeats: int) -> None:
    """Image batches with the prompt start before ``<|image|>`` shared vs computed per row."""
    whole = engine.with_mode("single_pass", share_prefix=False)
    sample = engine.prepare(pool[:1])
    shared_tokens = len(next(iter(sample.prefix_ids.values()))) if sample.prefix_ids else 0
    prompt_tokens = int(whole.prepare(pool[:1]).inputs["attention_mask"].sum())
    print(
        f"\nimage prompt start shared (tokens before <|image|>: {shared_tokens} of {prompt_tokens} per prompt)"
    )
    print(f"{'batch':>5} {'items':>5} {'shared it/s':>11} {'whole it/s':>10} {'ratio':>6}  identical")
    for size in (8, 32):
        chunks = batches_of(pool, size)
        prepared = {
            "shared": [engine.prepare(c) for c in chunks],
            "whole": [whole.prepare(c) for c in chunks],
        }
        out: dict[str, list] = {"shared": [], "whole": []}
        engines = {"shared": engine, "whole": whole}

        def runner(label: str) -> Callable[[], None]:
            return lambda: out[label].__setitem__(slice(None), run_all(engines[label], prepared[label]))

        rates = interleaved_rates(len(pool), {k: runner(k) for k in prepared}, repeats)
        print(
            f"{size:>5} {len(pool):>5} {rates['shared']:>11.1f} {rates['whole']:>10.1f} "
            f"{rates['shared'] / rates['whole']:>5.2f}x  {'yes' if same_results(out['shared'], out['whole']) else 'NO'}"
        )


def mixed_vs_split(engine: GuardEngine, arrivals: list[GuardRequest], repeats: int) -> None:
    """Windows of arrivals as one mixed batch each vs split into a text and an image batch each."""
    share = sum(r.has_image for r in arrivals) / len(arrivals)
    print(f"\nmixed vs split modalities ({len(arrivals)} arrivals, {share:.0%} with an image)")
    print(
        f"{'prefix':>6} {'window':>6} {'mixed it/s':>10} {'split it/s':>10} {'ratio':>6} {'padding mixed/split':>19}"
        f" {'passes':>7}  identical"
    )
    for share_prefix in (True, False):
        sibling = engine.with_mode("single_pass", share_prefix=share_prefix)
        for size in (8, 16, 32):
            windows = batches_of(arrivals, size)
            parts = [
                [start + k for k, r in enumerate(w) if r.has_image == modality]
                for start, w in zip(range(0, len(arrivals), size), windows)
                for modality in (False, True)
            ]
            parts = [p for p in parts if p]
            prepared = {
                "mixed": [sibling.prepare(w) for w in windows],
                "split": [sibling.prepare([arrivals[i] for i in p]) for p in parts],
            }
            out: dict[str, list] = {"mixed": [], "split": []}

            def runner(label: str) -> Callable[[], None]:
                return lambda: out[label].__setitem__(slice(None), run_all(sibling, prepared[label]))

            rates = interleaved_rates(len(arrivals), {k: runner(k) for k in prepared}, repeats)
            in_order: list = [None] * len(arrivals)
            for i, result in zip((i for p in parts for i in p), out["split"]):
                in_order[i] = result
            pads = {k: padding_share(v) for k, v in prepared.items()}
            print(
                f"{'on' if share_prefix else 'off':>6} {size:>6} {rates['mixed']:>10.1f} {rates['split']:>10.1f} "
                f"{rates['mixed'] / rates['split']:>5.2f}x {pads['mixed']:>9.0%}/{pads['split']:<9.0%} "
                f"{len(prepared['mixed']):>3}/{len(prepared['split']):<3}  "
                f"{'yes' if same_results(out['mixed'], in_order) else 'NO'}"
            )


def padding_share(batches: list[PreparedBatch]) -> float:
    """Fraction of the computed token positions (shared starts excluded) that are padding."""
    total = sum(b.inputs["input_ids"].numel() for b in batches)
    real = sum(int(b.inputs["attention_mask"][:, -b.inputs["input_ids"].shape[1] :].sum()) for b in batches)
    return 1 - real / total


if __name__ == "__main__":
    raise SystemExit(main())
