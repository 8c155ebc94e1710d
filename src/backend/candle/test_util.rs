//! What the kernel tests share: candle's own convolution as the reference,
//! and the tolerance a kernel's output must meet against it.

use candle_core::{Device, Tensor};

use super::cpu::Act;

/// candle's conv2d with padding (top, bottom, left, right) applied first, then
/// `bias` (one per filter) and `act`.
pub fn reference_conv(
    x: &Tensor,
    w: &Tensor,
    bias: &[f32],
    stride: usize,
    pad: [usize; 4],
    groups: usize,
    act: Act,
) -> Tensor {
    let [pt, pb, pl, pr] = pad;
    let y = x
        .pad_with_zeros(2, pt, pb)
        .unwrap()
        .pad_with_zeros(3, pl, pr)
        .unwrap()
        .conv2d(w, 0, stride, 1, groups)
        .unwrap();
    let b = Tensor::from_slice(bias, (1, bias.len(), 1, 1), &Device::Cpu).unwrap();
    let y = y.broadcast_add(&b).unwrap();
    match act {
        Act::None => y,
        Act::Relu => y.relu().unwrap(),
        Act::Relu6 => y.clamp(0f32, 6f32).unwrap(),
        Act::Silu => y.silu().unwrap(),
        Act::Sigmoid => (y.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap(),
        Act::Exp => y.exp().unwrap(),
    }
}

/// Every value within 1e-4 of the reference (relative above 1).
pub fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, e)) in got.iter().zip(want).enumerate() {
        assert!((a - e).abs() <= 1e-4 * e.abs().max(1.0), "{what} at {i}: {a} vs {e}");
    }
}

/// [`close`] for tensors of the same shape.
#[cfg_attr(not(feature = "candle-graph"), allow(dead_code))]
pub fn close_tensors(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let g: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let r: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    close(&g, &r, what);
}
