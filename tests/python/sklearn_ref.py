"""The outside reference for the decoder: sklearn's StandardScaler + Ridge on random data.

usage: sklearn_ref.py DIR ALPHA
Writes DIR/X.npy (train betas), DIR/X_test.npy, DIR/targets/{a,b}.npy, DIR/sklearn/coef_{a,b}.npy
(coef_ on z-scored betas), DIR/sklearn/pred_{a,b}.npy (predict on X_test), and the fitted models
exported with tools/export_sklearn.py into DIR/exported. Also the references for `mirage train`'s
options: DIR/sklearn/cv_alpha_{a,b}.txt, the penalty among CV_ALPHAS with the best mean held-out
Pearson correlation over 5 folds (trial i in fold i % 5, each fold re-centred, as mirage does),
and DIR/sklearn/pred_rank3_{a,b}.npy, reduced-rank ridge: the fitted map projected onto the top 3
right singular vectors of the (centred) training predictions. Per-head inputs: head a fitted on
the z-scored rows scaled to unit L2 norm, head b on the betas as given, predicted on X_test into
DIR/sklearn/pred_l2_a.npy, DIR/sklearn/pred_none_b.npy, exported (--head-input) into
DIR/exported_inputs.
"""
import os
import subprocess
import sys

import joblib
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

out, alpha = sys.argv[1], float(sys.argv[2])
CV_ALPHAS = [1.0, 100.0, 10000.0, 1000000.0]
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
    fitted = ridge.predict(z) - ridge.intercept_
    vr = np.linalg.svd(fitted, full_matrices=False)[2][:3].T
    rank3 = (ridge.predict(z_test) - ridge.intercept_) @ vr @ vr.T + ridge.intercept_
    np.save(f"{out}/sklearn/pred_rank3_{name}.npy", rank3.astype(np.float32))
    scores = []
    for a in CV_ALPHAS:
        score = 0.0
        for f in range(5):
            test = np.arange(n) % 5 == f
            fold = Ridge(alpha=a).fit(z[~test], y[~test])
            p = fold.predict(z[test])
            score += np.mean([np.corrcoef(p[:, j], y[test][:, j])[0, 1] for j in range(y.shape[1])])
        scores.append(score / 5)
    print(name, "CV mean held-out r per alpha:", dict(zip(CV_ALPHAS, np.round(scores, 4))))
    with open(f"{out}/sklearn/cv_alpha_{name}.txt", "w") as f:
        f.write(repr(CV_ALPHAS[int(np.argmax(scores))]))
tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "export_sklearn.py")
subprocess.run([sys.executable, tool, "--head", f"a={out}/sklearn/ridge_a.joblib:6", "--head", f"b={out}/sklearn/ridge_b.joblib:2,5",
                "--scaler", f"{out}/sklearn/scaler.joblib", "--out", f"{out}/exported"], check=True)

l2 = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
ya = np.load(f"{out}/targets/a.npy").reshape(n, -1)
yb = np.load(f"{out}/targets/b.npy").reshape(n, -1)
ridge_l2 = Ridge(alpha=alpha).fit(l2(z), ya)
ridge_none = Ridge(alpha=alpha).fit(x[:n], yb)
joblib.dump(ridge_l2, f"{out}/sklearn/ridge_l2_a.joblib")
joblib.dump(ridge_none, f"{out}/sklearn/ridge_none_b.joblib")
np.save(f"{out}/sklearn/pred_l2_a.npy", ridge_l2.predict(l2(z_test)).astype(np.float32))
np.save(f"{out}/sklearn/pred_none_b.npy", ridge_none.predict(x[n:]).astype(np.float32))
subprocess.run([sys.executable, tool, "--head", f"a={out}/sklearn/ridge_l2_a.joblib:6",
                "--head", f"b={out}/sklearn/ridge_none_b.joblib:2,5", "--head-input", "a=l2", "--head-input", "b=none",
                "--scaler", f"{out}/sklearn/scaler.joblib", "--out", f"{out}/exported_inputs"], check=True)
print("ok")
