#!/usr/bin/env python3
"""Reference outputs from an independent runtime: onnxruntime's Python API.

Run once after `bash models/fetch` and a build with the onnx feature:
    pip install onnxruntime==1.32.0 numpy
    python3 models/make_reference.py target/debug/ai-edge-inference > tests/reference/onnx_outputs.json

For every (model, photo), the service binary writes the exact tensor it feeds
(`ai-edge-inference tensor`); onnxruntime (Python) runs that tensor, and a
sample of the raw outputs is stored: every logit for the classifier, and all
attributes of the five strongest anchors for the detector. tests/onnx_models.rs
feeds the same tensor through the Rust backend and compares.
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODELS = [
    ("efficientnet-lite0", [1, 3, 224, 224]),
    ("yolov12n", [1, 3, 640, 640]),
]
PHOTOS = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]


def main():
    binary = sys.argv[1]
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in MODELS:
            config = os.path.join(HERE, name + ".yaml")
            onnx_file = os.path.join(HERE, ".cache", name + ".onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(onnx_file, opts, providers=["CPUExecutionProvider"])
            input_name = sess.get_inputs()[0].name
            for photo in PHOTOS:
                out = os.path.join(tmp, "t.bin")
                subprocess.run([binary, "tensor", os.path.join(ROOT, "tests/fixtures", photo), "--out", out],
                               env={**os.environ, "MODEL_CONFIG_PATH": config}, check=True)
                x = np.fromfile(out, dtype="<f4").reshape(shape)
                y = sess.run(None, {input_name: x})[0]
                flat = y.reshape(-1)
                if name == "yolov12n":
                    attrs, anchors = y.shape[1], y.shape[2]
                    best = np.argsort(-y[0, 4:, :].max(axis=0))[:5]
                    indices = [int(a * anchors + i) for i in best for a in range(attrs)]
                else:
                    indices = list(range(flat.size))
                entries.append({
                    "model": name,
                    "photo": photo,
                    "output_shape": list(y.shape),
                    "tensor_sum": float(x.astype(np.float64).sum()),
                    "indices": indices,
                    "values": [round(float(flat[i]), 6) for i in indices],
                })
    json.dump({"tool": f"onnxruntime {ort.__version__} (Python, CPUExecutionProvider)", "entries": entries},
              sys.stdout, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
