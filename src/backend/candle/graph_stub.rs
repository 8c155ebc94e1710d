//! Stand-in for ONNX graphs on Candle when the `candle-graph` feature is off:
//! same shape, every compile answers with the feature to enable.

use std::collections::HashMap;

/// Whether ONNX graphs compile in this build.
pub const COMPILED: bool = false;

pub struct Plan {
    pub input_name: String,
    pub input_dims: Vec<i64>,
    pub metadata: HashMap<String, String>,
}

impl Plan {
    pub fn from_onnx(_bytes: &[u8]) -> Result<Plan, String> {
        Err("ONNX graphs on Candle are not compiled into this build; rebuild with `--features candle-graph`".into())
    }

    pub fn from_onnx_on(bytes: &[u8], _device: &candle_core::Device) -> Result<Plan, String> {
        Plan::from_onnx(bytes)
    }

    pub fn run_slice(
        &mut self,
        _input: &[f32],
        _dims: &[usize],
        _device: &candle_core::Device,
        _out: &mut Vec<f32>,
        _times: Option<&mut Vec<(String, std::time::Duration)>>,
    ) -> candle_core::Result<Vec<usize>> {
        Err(candle_core::Error::Msg(
            "ONNX graphs on Candle are not compiled into this build".into(),
        ))
    }
}

pub fn bench_layouts(_iters: usize) -> Result<String, String> {
    Err("`bench layouts` compares the graph path's NCHW kernels with the NHWC ones; rebuild with `--features candle-graph`".into())
}
