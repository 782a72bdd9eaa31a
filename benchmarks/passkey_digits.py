"""Per-digit accuracy of a trained run on the passkey task, by distance.

Tells retrieval from ordering: a model that finds the key but not its order gets the first digit (after the
unique ":") right and the later ones only partly (benchmarks/RESULTS.md, "Choosing the tasks").

    python benchmarks/passkey_digits.py RUN [--digits 5] [--n 200] [--distances 12 32 64 112]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from dynaformer.data.tasks import make_task
from dynaformer.runs import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--digits", type=int, default=5)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--distances", type=int, nargs="+", default=[12, 32, 64, 112])
    args = ap.parse_args()
    model, _, _ = load_model(args.run)
    model.eval()
    C = model.cfg.context_len
    task = make_task("passkey", digits=args.digits)
    D = task.answer_len
    print("| distance | " + " | ".join(f"digit {i + 1}" for i in range(D)) + " | exact |")
    print("|---" * (D + 2) + "|")
    for d in args.distances:
        batch = task.generate(args.n, C, d, seed=5)
        x = torch.from_numpy(batch.tokens[:, :-1].astype(np.int64))
        with torch.no_grad():
            logits = model(x)[0]  # (n, C, V)
        a = int(batch.answers[0, 0])
        pred = logits[:, a - 1 : a - 1 + D].argmax(-1).numpy()  # position t predicts token t + 1
        hit = pred == batch.tokens[:, a : a + D]
        print(f"| {d} | " + " | ".join(f"{x:.2f}" for x in hit.mean(0)) + f" | {hit.all(1).mean():.2f} |")


if __name__ == "__main__":
    main()
