"""The outside reference for the decoder: sklearn's StandardScaler + Ridge on random data.

usage: sklearn_ref.py DIR ALPHA
Writes DIR/X.npy (train betas), DIR/X_test.npy, DIR/targets/{a,b}.npy, DIR/sklearn/coef_{a,b}.npy
(coef_ on z-scored betas), DIR/sklearn/pred_{a,b}.npy (predict on X_test), and the fitted models
exported with tools/export_sklearn.py into DIR/exported.
"""
import os
import subprocess
import sys

import joblib
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

out, alpha = sys.argv[1], float(sys.argv[2])
rng = np.random.default_rng(0)
n, n_test, v = 80, 20, 300
x = rng.normal(size=(n + n_test, v)).astype(np.float32) * rng.uniform(0.5, 2.0, size=v).astype(np.float32) + 3.0
w = {"a": rng.normal(size=(v, 6)), "b": rng.normal(size=(v, 2 * 5))}
os.makedirs(f"{out}/targets", exist_ok=True)
os.makedirs(f"{out}/sklearn", exist_ok=True)
np.save(f"{out}/X.npy", x[:n])
np.save(f"{out}/X_test.npy", x[n:])
scaler = StandardScaler().fit(x[:n])
joblib.dump(scaler, f"{out}/sklearn/scaler.joblib")
z, z_test = scaler.transform(x[:n]), scaler.transform(x[n:])
shapes = {"a": "6", "b": "2,5"}
for name, wt in w.items():
    y = (x[:n] @ wt + rng.normal(size=(n, wt.shape[1])) * 5).astype(np.float32)
    np.save(f"{out}/targets/{name}.npy", y.reshape((n,) + tuple(int(s) for s in shapes[name].split(","))))
    ridge = Ridge(alpha=alpha).fit(z, y)
    joblib.dump(ridge, f"{out}/sklearn/ridge_{name}.joblib")
    np.save(f"{out}/sklearn/coef_{name}.npy", ridge.coef_.astype(np.float32))
    np.save(f"{out}/sklearn/intercept_{name}.npy", ridge.intercept_.astype(np.float32))
    np.save(f"{out}/sklearn/pred_{name}.npy", ridge.predict(z_test).astype(np.float32))
tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "export_sklearn.py")
subprocess.run([sys.executable, tool, "--head", f"a={out}/sklearn/ridge_a.joblib:6", "--head", f"b={out}/sklearn/ridge_b.joblib:2,5",
                "--scaler", f"{out}/sklearn/scaler.joblib", "--out", f"{out}/exported"], check=True)
print("ok")
