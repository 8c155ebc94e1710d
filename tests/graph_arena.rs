//! The Candle graph path's allocations per frame, after warm-up, on YOLOv12n (`models/fetch`):
//! the arena holds every intermediate and the GEMM packs into each pool thread's reused
//! scratch (`gemm.rs`), so a frame allocates next to nothing (BENCHMARKS.md, "Our own GEMM").
//! The bound is 50. A tensor per step (`AEI_ARENA=off`) made over 4,000 allocations and
//! 287 MB per frame, and the `gemm` crate about 1,300. Alone in its test binary: the counts are
//! process-wide (the pool's threads run the kernels).
#![cfg(feature = "candle-graph")]

mod support;

use ai_edge_inference::alloc_count::{snapshot_all, CountingAlloc};
use ai_edge_inference::backend::Backend as _;
use ai_edge_inference::config::model;
use ai_edge_inference::models::{Models, Runner};
use ai_edge_inference::preprocess;
use support::*;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

#[test]
fn a_yolov12n_frame_on_the_candle_graph_allocates_at_most_50_times() {
    let cfg = model::load_file(&root().join("models/yolov12n-candle.yaml"), &settings()).unwrap();
    assert!(
        cfg.model_path.as_ref().unwrap().exists(),
        "run `bash models/fetch` for yolov12n.onnx"
    );
    let models = Models::load(vec![cfg], &backend_env());
    let Runner::Ml(ml) = &models.list[0].runner else {
        panic!("{:?}", models.list[0].config.name)
    };
    let n = preprocess::tensor_len(&models.list[0].config.preprocessing);
    let tensor: Vec<f32> = (0..n).map(|i| (i % 251) as f32 / 251.0).collect();
    let mut ml = ml.lock();
    let ml = &mut *ml;
    // The load ran the warm-up frame (the arena's layout); one more to be sure.
    ml.primary.engine.infer(&tensor, &mut ml.primary.outputs).unwrap();
    let first = ml.primary.outputs.values.clone();
    for round in 0..3 {
        let (a, b) = snapshot_all();
        ml.primary.engine.infer(&tensor, &mut ml.primary.outputs).unwrap();
        let (a2, b2) = snapshot_all();
        let (count, bytes) = (a2 - a, b2 - b);
        println!("round {round}: {count} allocations, {bytes} bytes");
        assert!(count <= 50, "round {round}: {count} allocations");
        assert!(bytes < 4 << 20, "round {round}: {bytes} bytes");
        assert_eq!(ml.primary.outputs.shape, [1, 84, 8400]);
        assert_eq!(
            ml.primary.outputs.values, first,
            "round {round}: the same frame gives the same answer"
        );
    }
}
