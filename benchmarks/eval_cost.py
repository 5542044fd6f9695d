"""Seconds per document of each evaluation task: what the document budget (``--docs``,
``bitplan/evaluation/budget.py``) weighs its allocation by.

Each task is evaluated alone at two document counts (``--docs`` with one task, so the same
seeded documents a budget would pick); the cost per document is the difference in time over
the difference in documents, which leaves out the fixed cost of loading a task.

    .venv/bin/python benchmarks/eval_cost.py [--model gemma3-270m] [--small 60 --large 180]
"""

from __future__ import annotations

import argparse
import time

from bitplan.data.offline_tasks import DEFAULT_TASKS
from bitplan.evaluation import evaluate_tasks
from bitplan.evaluation.budget import DOCUMENT_SECONDS, minimum_documents
from bitplan.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundled model key or folder")
    parser.add_argument("--small", type=int, default=60, help="documents of the first run")
    parser.add_argument("--large", type=int, default=180, help="documents of the second run")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    model = load_model(args.model)
    print(f"{model.name} ({model.note}); batch size {args.batch_size}", flush=True)
    print("| task | docs | s | docs | s | s per document | in budget.py |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task in DEFAULT_TASKS:
        runs = []
        for docs in (args.small, args.large):
            docs = max(docs, minimum_documents([task]))
            start = time.perf_counter()
            results = evaluate_tasks(
                model.module, model.tokenizer, [task], docs=docs, batch_size=args.batch_size
            )
            runs.append((results.scores[task].n, time.perf_counter() - start))
        (n1, t1), (n2, t2) = runs
        per_doc = (t2 - t1) / (n2 - n1)
        print(
            f"| {task} | {n1} | {t1:.1f} | {n2} | {t2:.1f} | {per_doc:.3f} "
            f"| {DOCUMENT_SECONDS[task]:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
