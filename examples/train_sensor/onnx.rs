//! Writes a dense network as an ONNX model (opset 13): `Gemm` (transB = 1, PyTorch's
//! `[out, in]` weights) and `Relu` between layers, the weights as initializers named as in the
//! safetensors file (`layers.{i}.weight`, `layers.{i}.bias`). Protobuf's wire format by hand:
//! varints and length-delimited fields, the few messages ONNX needs.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn int(out: &mut Vec<u8>, field: u32, v: i64) {
    tag(out, field, 0);
    varint(out, v as u64);
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn msg(out: &mut Vec<u8>, field: u32, build: impl FnOnce(&mut Vec<u8>)) {
    let mut m = Vec::new();
    build(&mut m);
    bytes(out, field, &m);
}

/// TensorProto: float32 `values` of shape `dims`, named `name`.
fn tensor(out: &mut Vec<u8>, name: &str, dims: &[usize], values: &[f32]) {
    for &d in dims {
        int(out, 1, d as i64);
    }
    int(out, 2, 1); // FLOAT
    bytes(out, 8, name.as_bytes());
    let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    bytes(out, 9, &raw);
}

/// ValueInfoProto: a float32 tensor `[1, n]`.
fn value_info(out: &mut Vec<u8>, name: &str, n: usize) {
    bytes(out, 1, name.as_bytes());
    msg(out, 2, |t| {
        msg(t, 1, |tt| {
            int(tt, 1, 1); // elem_type FLOAT
            msg(tt, 2, |shape| {
                for d in [1, n] {
                    msg(shape, 1, |dim| int(dim, 1, d as i64));
                }
            });
        });
    });
}

fn node(out: &mut Vec<u8>, op: &str, name: &str, inputs: &[&str], output: &str, trans_b: bool) {
    for i in inputs {
        bytes(out, 1, i.as_bytes());
    }
    bytes(out, 2, output.as_bytes());
    bytes(out, 3, name.as_bytes());
    bytes(out, 4, op.as_bytes());
    if trans_b {
        msg(out, 5, |a| {
            bytes(a, 1, b"transB");
            int(a, 3, 1);
            int(a, 20, 2); // AttributeType INT
        });
    }
}

/// The model: `layers` as (weight `[out, in]` row-major, bias, out, in); input `input`,
/// output `output`; `meta` as metadata properties.
pub fn write(
    layers: &[(Vec<f32>, Vec<f32>, usize, usize)],
    input: &str,
    output: &str,
    meta: &[(&str, String)],
) -> Vec<u8> {
    let mut model = Vec::new();
    int(&mut model, 1, 8); // ir_version
    bytes(&mut model, 2, b"ai-edge-inference examples/train_sensor");
    msg(&mut model, 7, |g| {
        let last = layers.len() - 1;
        let mut x = input.to_owned();
        for (i, _) in layers.iter().enumerate() {
            let (w, b) = (format!("layers.{i}.weight"), format!("layers.{i}.bias"));
            let y = if i == last {
                output.to_owned()
            } else {
                format!("gemm{i}")
            };
            msg(g, 1, |n| node(n, "Gemm", &format!("dense{i}"), &[&x, &w, &b], &y, true));
            x = y;
            if i < last {
                let r = format!("relu{i}");
                msg(g, 1, |n| node(n, "Relu", &r, &[&x], &r, false));
                x = r;
            }
        }
        bytes(g, 2, b"sensor-autoencoder");
        for (i, (w, b, o, n)) in layers.iter().enumerate() {
            msg(g, 5, |t| tensor(t, &format!("layers.{i}.weight"), &[*o, *n], w));
            msg(g, 5, |t| tensor(t, &format!("layers.{i}.bias"), &[*o], b));
        }
        msg(g, 11, |v| value_info(v, input, layers[0].3));
        msg(g, 12, |v| value_info(v, output, layers[last].2));
    });
    msg(&mut model, 8, |o| {
        bytes(o, 1, b"");
        int(o, 2, 13);
    });
    for (k, v) in meta {
        msg(&mut model, 14, |p| {
            bytes(p, 1, k.as_bytes());
            bytes(p, 2, v.as_bytes());
        });
    }
    model
}
