"""Ridge regression on scikit-learn's bundled diabetes data set, logging alpha and MSE per fold.

Runs the same by hand (`python train.py --alpha 0.5`, an offline run that prints its metrics) and as a
submitted run on any compute target.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
from datetime import date

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import KFold

from airflow_amlrun.run_context import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--alpha", type=float, default=0.5, help="regularisation strength")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--as-of",
        default=None,
        help="train on the data collected up to this date (YYYY-MM-DD); default: all of it",
    )
    args = parser.parse_args()

    run = Run.get_context()
    X, y = load_diabetes(return_X_y=True)
    if args.as_of is not None:
        # The bundled set stands in for data that keeps arriving: 200 patients by 2026-01-01, 20 more a week.
        weeks = (date.fromisoformat(args.as_of) - date(2026, 1, 1)).days // 7
        collected = max(100, min(len(X), 200 + 20 * weeks))
        X, y = X[:collected], y[:collected]
        run.tag("data_as_of", args.as_of)
    print(f"diabetes data: {X.shape[0]} samples, {X.shape[1]} features; alpha={args.alpha}")
    run.log("alpha", args.alpha)

    errors = []
    for fold, (train, test) in enumerate(KFold(args.folds, shuffle=True, random_state=0).split(X)):
        model = Ridge(alpha=args.alpha).fit(X[train], y[train])
        mse = mean_squared_error(y[test], model.predict(X[test]))
        errors.append(mse)
        run.log("fold_mse", mse, step=fold)
        print(f"fold {fold}: mse={mse:.2f}")

    model = Ridge(alpha=args.alpha).fit(X, y)
    run.log("mse", float(np.mean(errors)))
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/model.pkl", "wb") as out:
        pickle.dump(model, out)
    with open("outputs/metrics.json", "w") as out:
        json.dump({"alpha": args.alpha, "mse": float(np.mean(errors))}, out)
    print(f"mean mse={np.mean(errors):.2f}; model written to outputs/model.pkl")


if __name__ == "__main__":
    main()
