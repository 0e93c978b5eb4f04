"""The built-in demo repository: small real models trained at first start on datasets that
ship inside scikit-learn, converted to ONNX, and cached in the data directory."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

DEMO_FORMAT = 2
ONNX_OPSETS = {"": 17, "ai.onnx.ml": 3}


def _stamp() -> str:
    import onnx
    import skl2onnx
    import sklearn

    return f"v{DEMO_FORMAT}-sklearn{sklearn.__version__}-skl2onnx{skl2onnx.__version__}-onnx{onnx.__version__}"


def ensure_demo_repository(data_dir: Path) -> Path:
    """Return the demo repository, building it on first use (a few seconds, no download)."""
    root = data_dir / "demo-repository"
    target = root / _stamp()
    if (target / ".complete").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    log.info("building the demo model repository (first start only)", extra={"path": str(target)})
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_demo_models(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / ".complete").is_file():  # lost a race with another process: fine
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_model(repo: Path, name: str, onnx_bytes: bytes, spec: dict[str, Any]) -> None:
    vdir = repo / name / "1"
    vdir.mkdir(parents=True)
    (vdir / "model.onnx").write_bytes(onnx_bytes)
    spec = {"name": name, **spec,
            "files": {"sha256": {"1/model.onnx": hashlib.sha256(onnx_bytes).hexdigest()}}}
    (repo / name / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False, width=100))


def build_demo_models(repo: Path) -> None:
    import numpy as np
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    batching = {"max_batch_size": 64, "max_queue_delay_ms": 1}

    iris = load_iris()
    y = np.asarray(iris.target_names)[iris.target]
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(iris.data, y)
    onx = to_onnx(clf, initial_types=[("features", FloatTensorType([None, 4]))],
                  options={id(clf): {"zipmap": False}}, target_opset=ONNX_OPSETS)
    _write_model(repo, "iris", onx.SerializeToString(), {
        "task": "classification",
        "description": "Iris species from sepal length, sepal width, petal length, petal width (cm). "
                       "Logistic regression trained on scikit-learn's iris dataset.",
        "labels": [str(x) for x in clf.classes_],
        "batching": batching,
    })

    bc = load_breast_cancer()
    y = np.asarray(bc.target_names)[bc.target]
    rf = RandomForestClassifier(n_estimators=40, max_depth=6, random_state=0).fit(bc.data, y)
    onx = to_onnx(rf, initial_types=[("features", FloatTensorType([None, bc.data.shape[1]]))],
                  options={id(rf): {"zipmap": False}}, target_opset=ONNX_OPSETS)
    _write_model(repo, "breast-cancer", onx.SerializeToString(), {
        "task": "classification",
        "description": "Tumour malignant/benign from 30 cell-nucleus measurements (scikit-learn's "
                       "Wisconsin breast cancer dataset). Random forest, 40 trees.",
        "labels": [str(x) for x in rf.classes_],
        "batching": batching,
    })

    diab = load_diabetes()
    reg = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(diab.data, diab.target)
    onx = to_onnx(reg, initial_types=[("features", FloatTensorType([None, diab.data.shape[1]]))],
                  final_types=[("progression", FloatTensorType([None, 1]))], target_opset=ONNX_OPSETS)
    _write_model(repo, "diabetes", onx.SerializeToString(), {
        "task": "tensor",
        "description": "Disease progression one year after baseline from 10 normalised measurements "
                       "(scikit-learn's diabetes dataset). Ridge regression.",
        "batching": batching,
    })
