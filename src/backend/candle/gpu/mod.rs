//! The Candle backend on NVIDIA GPUs (the `cuda` feature): opening a device
//! without assuming a driver is there, and launching our kernels
//! (`kernels.cu`, compiled to PTX by build.rs) for the ops in `device_ops.rs`.
//!
//! candle-core is built with cudarc's `dynamic-loading` (`profiles/gpu-setup`):
//! the driver, cuBLAS and cuRAND are opened when a GPU is first asked for.
//! cudarc panics when one is missing, so `open` asks first and answers a
//! reason, which the GPU policy turns into an error or a CPU fallback.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{Device, Layout, Result, Shape, Tensor};

use super::cpu::Act;

static PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/aei_kernels.ptx"));
const MODULE: &str = "aei_kernels";

/// CUDA device `ordinal`, checked with one launch of our kernels; or why it cannot be used.
pub fn open(ordinal: usize) -> std::result::Result<Device, String> {
    // SAFETY: each only tries to dlopen the library, and closes it again.
    let libs = unsafe {
        [
            (
                "the NVIDIA driver (libcuda.so)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("cuBLAS (libcublas.so)", cudarc::cublas::sys::is_culib_present()),
            ("cuBLASLt (libcublasLt.so)", cudarc::cublaslt::sys::is_culib_present()),
            ("cuRAND (libcurand.so)", cudarc::curand::sys::is_culib_present()),
        ]
    };
    let missing: Vec<&str> = libs.iter().filter(|(_, ok)| !ok).map(|(n, _)| *n).collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} cannot be loaded: no NVIDIA driver or CUDA 13 libraries on this machine, or not on LD_LIBRARY_PATH",
            missing.join(", ")
        ));
    }
    let device = std::panic::catch_unwind(|| Device::new_cuda(ordinal))
        .map_err(|_| format!("opening CUDA device {ordinal} panicked"))?
        .map_err(|e| format!("CUDA device {ordinal}: {e}"))?;
    // Loads our PTX and runs it once: a driver too old for it shows here, not on a frame.
    let x = Tensor::new(&[-1f32, 2.0, 7.0], &device).map_err(|e| e.to_string())?;
    let y = x
        .apply_op1_no_bwd(&super::device_ops::Activate(Act::Relu6))
        .and_then(|y| y.to_vec1::<f32>())
        .map_err(|e| format!("CUDA device {ordinal}: our kernels do not run: {e}"))?;
    if y != [0.0, 2.0, 6.0] {
        return Err(format!(
            "CUDA device {ordinal}: our kernels give {y:?} for relu6(-1, 2, 7)"
        ));
    }
    Ok(device)
}

/// The kernels' activation codes (`aei_act` in kernels.cu).
fn act_code(act: Act) -> i32 {
    match act {
        Act::None => 0,
        Act::Relu => 1,
        Act::Relu6 => 2,
        Act::Silu => 3,
        Act::Sigmoid => 4,
        Act::Exp => 5,
    }
}

fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: a contiguous input expected")))?;
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

fn grid(len: usize) -> Result<LaunchConfig> {
    let n =
        u32::try_from(len).map_err(|_| candle_core::Error::Msg(format!("{len} elements: too many for one launch")))?;
    Ok(LaunchConfig::for_num_elems(n))
}

fn device(s: &CudaStorage) -> &CudaDevice {
    s.device()
}

/// `act(x + bias[c])` over `[n, c, ...]`; without a bias, `act(x)`.
pub fn bias_act(
    x: &CudaStorage,
    xl: &Layout,
    bias: Option<(&CudaStorage, &Layout)>,
    act: Act,
) -> Result<(CudaStorage, Shape)> {
    let dev = device(x);
    let xs = view(x, xl, "activation")?;
    let dims = xl.dims();
    let len = xl.shape().elem_count();
    let c = dims.get(1).copied().unwrap_or(1).max(1) as u32;
    let hw = dims.iter().skip(2).product::<usize>().max(1) as u32;
    let mut y = unsafe { dev.alloc::<f32>(len)? };
    let f = dev.get_or_load_custom_func("aei_bias_act", MODULE, PTX)?;
    let (len64, code, null) = (len as u64, act_code(act), 0u64);
    let bias = bias.map(|(b, bl)| view(b, bl, "bias")).transpose()?;
    let mut b = f.builder();
    b.arg(&mut y).arg(&xs);
    match &bias {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&len64).arg(&c).arg(&hw).arg(&code);
    // SAFETY: the arguments match aei_bias_act's parameters; every index is bounds-checked there.
    unsafe { b.launch(grid(len)?) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), xl.shape().clone()))
}

/// Depthwise convolution of `x` `[n, c, h, w]` by `w` `[c, 1, k, k]` plus `bias` `[c]`.
#[allow(clippy::too_many_arguments)]
pub fn depthwise(
    (x, xl): (&CudaStorage, &Layout),
    (w, wl): (&CudaStorage, &Layout),
    (bias, bl): (&CudaStorage, &Layout),
    geo: super::device_ops::DwGeometry,
    act: Act,
) -> Result<(CudaStorage, Shape)> {
    let dev = device(x);
    let (xs, ws, bs) = (
        view(x, xl, "depthwise input")?,
        view(w, wl, "weights")?,
        view(bias, bl, "bias")?,
    );
    let g = geo;
    let len = g.n * g.c * g.ho * g.wo;
    let mut y = unsafe { dev.alloc::<f32>(len)? };
    let f = dev.get_or_load_custom_func("aei_depthwise", MODULE, PTX)?;
    let u = |v: usize| v as u32;
    let (nc, c, h, wd, ho, wo, k, s, pt, pl, code) = (
        u(g.n * g.c),
        u(g.c),
        u(g.h),
        u(g.w),
        u(g.ho),
        u(g.wo),
        u(g.k),
        u(g.stride),
        u(g.pad_t),
        u(g.pad_l),
        act_code(act),
    );
    let mut b = f.builder();
    b.arg(&mut y).arg(&xs).arg(&ws).arg(&bs);
    b.arg(&nc)
        .arg(&c)
        .arg(&h)
        .arg(&wd)
        .arg(&ho)
        .arg(&wo)
        .arg(&k)
        .arg(&s)
        .arg(&pt)
        .arg(&pl)
        .arg(&code);
    // SAFETY: the arguments match aei_depthwise's parameters; the shapes were checked by the caller.
    unsafe { b.launch(grid(len)?) }.w()?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        Shape::from((g.n, g.c, g.ho, g.wo)),
    ))
}
