"""Train the `model="auto"` classifier: bench/routing/train.jsonl -> proxy/routing/auto_router.json.

Multinomial logistic regression with L2, fitted by full-batch gradient descent in numpy on the features
proxy/routing/auto.py extracts (the same function, so training and serving cannot disagree). The L2 strength
is chosen by 5-fold cross-validation on the training set alone; bench/routing/eval.jsonl is never read here
(bench/bench_routing.py measures on it). Deterministic: same data, same file.

    .venv/bin/python bench/train_router.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.routing.auto import MODEL_PATH, features  # noqa: E402

TRAIN = ROOT / "bench" / "routing" / "train.jsonl"
L2_CHOICES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
STEPS, LEARNING_RATE = 1500, 2.0


def read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def design(rows: list[dict[str, str]], vocab: dict[str, int]) -> np.ndarray:
    """(N, F): each row the request's features in `vocab`, scaled by 1/sqrt(its number of features)."""
    x = np.zeros((len(rows), len(vocab)), dtype=np.float64)
    for i, row in enumerate(rows):
        found = features(row["prompt"], row.get("system", ""))
        cols = [vocab[f] for f in found if f in vocab]
        x[i, cols] = 1.0 / np.sqrt(len(found))
    return x


def fit(x: np.ndarray, y: np.ndarray, classes: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression: weights (F, C) and bias (C,)."""
    n = x.shape[0]
    w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[y]
    for _ in range(STEPS):
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        grad = (p - onehot) / n
        w -= LEARNING_RATE * (x.T @ grad + l2 * w)
        b -= LEARNING_RATE * grad.sum(axis=0)
    return w, b


def cross_validate(rows: list[dict[str, str]], labels: list[str], l2: float, folds: int = 5) -> float:
    right = 0
    for k in range(folds):
        train = [r for i, r in enumerate(rows) if i % folds != k]
        held = [r for i, r in enumerate(rows) if i % folds == k]
        vocab = vocabulary(train)
        w, b = fit(design(train, vocab), np.array([labels.index(r["alias"]) for r in train]), len(labels), l2)
        predicted = (design(held, vocab) @ w + b).argmax(axis=1)
        right += int(sum(labels[p] == r["alias"] for p, r in zip(predicted, held, strict=True)))
    return right / len(rows)


def vocabulary(rows: list[dict[str, str]]) -> dict[str, int]:
    found = sorted({f for r in rows for f in features(r["prompt"], r.get("system", ""))})
    return {f: i for i, f in enumerate(found)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, default=TRAIN)
    parser.add_argument("--out", type=Path, default=MODEL_PATH)
    args = parser.parse_args()
    rows = read(args.train)
    labels = list(dict.fromkeys(r["alias"] for r in rows))
    scored = {l2: cross_validate(rows, labels, l2) for l2 in L2_CHOICES}
    for l2, accuracy in scored.items():
        print(f"l2={l2:g}: 5-fold accuracy on the training set {accuracy:.3f}")
    l2 = max(L2_CHOICES, key=lambda c: (scored[c], c))  # ties: the stronger penalty
    vocab = vocabulary(rows)
    w, b = fit(design(rows, vocab), np.array([labels.index(r["alias"]) for r in rows]), len(labels), l2)
    weights = {f: [round(float(v), 4) for v in w[i]] for f, i in vocab.items() if np.abs(w[i]).max() >= 5e-4}
    model = {"labels": labels, "bias": [round(float(v), 4) for v in b], "weights": weights,
             "trained_on": {"file": str(args.train.relative_to(ROOT)) if args.train.is_relative_to(ROOT) else str(args.train),
                            "rows": len(rows), "l2": l2, "steps": STEPS}}
    args.out.write_text(json.dumps(model, ensure_ascii=False, separators=(",", ":"), sort_keys=True) + "\n",
                        encoding="utf-8")
    print(f"l2={l2:g}; {len(weights)} of {len(vocab)} features kept; wrote {args.out} "
          f"({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
