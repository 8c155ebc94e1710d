//! Stand-in for `gpu/` when the `cuda` feature is off: same shape; a GPU asked
//! for is "not in this build", which the GPU policy turns into an error or a
//! CPU fallback. The kernels are never reached (no tensor is ever on a GPU).

use candle_core::{CudaStorage, Device, Layout, Result, Shape};

use super::cpu::Act;

pub fn open(_ordinal: usize) -> std::result::Result<Device, String> {
    Err("this build has no CUDA support (the `cuda` feature: build the `gpu` profile, `profiles/build gpu`)".into())
}

fn not_compiled<T>() -> Result<T> {
    Err(candle_core::Error::Msg(
        "the `cuda` feature is not in this build".into(),
    ))
}

pub fn bias_act(
    _x: &CudaStorage,
    _xl: &Layout,
    _bias: Option<(&CudaStorage, &Layout)>,
    _act: Act,
) -> Result<(CudaStorage, Shape)> {
    not_compiled()
}

pub fn depthwise(
    _x: (&CudaStorage, &Layout),
    _w: (&CudaStorage, &Layout),
    _bias: (&CudaStorage, &Layout),
    _geo: super::device_ops::DwGeometry,
    _act: Act,
) -> Result<(CudaStorage, Shape)> {
    not_compiled()
}
