//! Allocations per frame on the frame path, after warm-up, counted by a
//! global allocator: zero in our own code (envelope parsing, base64,
//! preprocessing, analysis, result building); the JPEG decoder's own
//! allocations are measured and must be all there is.

use std::time::SystemTime;

use ai_edge_inference::alloc_count::{snapshot, CountingAlloc};
use ai_edge_inference::backend::BackendEnv;
use ai_edge_inference::config::model::{self, ChannelOrder, Layout, Preprocessing, ResizeFilter, ResizeMode};
use ai_edge_inference::config::Settings;
use ai_edge_inference::frame::{Limits, Origin, Slot};
use ai_edge_inference::metrics::Metrics;
use ai_edge_inference::models::Models;
use ai_edge_inference::process::{self, Ctx, Emitted};
use ai_edge_inference::result::{self, Prediction, Timings};
use ai_edge_inference::{decode, ingest, preprocess};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn allocs_during(f: impl FnOnce()) -> u64 {
    let (a, _) = snapshot();
    f();
    snapshot().0 - a
}

fn jpeg() -> Vec<u8> {
    std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/rocket-1080p.jpg")).unwrap()
}

#[test]
fn ingest_decode_analyse_and_result_allocate_only_in_the_decoder() {
    let settings = Settings::from_env_and_args(|_| None, &[]).unwrap().0;
    let cfg = model::builtin_camera_health(&settings).unwrap();
    let models = Models::load(vec![cfg], &BackendEnv::default());
    let metrics = Metrics::default();
    let limits = Limits {
        max_payload: 1 << 20,
        max_width: 1920,
        max_height: 1080,
        max_tensor: 0,
        max_input_width: 0,
        max_picture: 0,
    };
    let mut slot = Slot::new(&limits);
    let ctx = Ctx {
        models: &models,
        metrics: &metrics,
        max_width: 1920,
        max_height: 1080,
        error_topic: "errors",
    };

    let jpeg = jpeg();
    let b64 = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    };
    let envelope = format!(
        r#"{{"device_id":"cam-1","timestamp":"2026-11-27T10:00:00Z","image_data":"{b64}","metadata":{{"line":"L2"}}}}"#
    )
    .into_bytes();
    let topic = "edge-ai/bu/fac/gw/camera/snapshots";
    let mut routes = Vec::with_capacity(8);
    let mut results = 0;

    let mut one_frame = |slot: &mut Slot, results: &mut usize| -> (u64, u64) {
        let ingest_allocs = allocs_during(|| {
            ingest::route(&models, topic, &mut routes);
            let a = ingest::admit(topic, &envelope, None, limits.max_payload, &models, &routes).unwrap();
            slot.reset();
            slot.routes.extend_from_slice(&routes);
            ingest::fill(slot, topic, &envelope, &a, Origin::Mqtt).unwrap();
        });
        let process_allocs = allocs_during(|| {
            process::process(slot, &ctx, |s, kind| {
                assert_eq!(kind, Emitted::Result, "{}", String::from_utf8_lossy(&s.out));
                assert_eq!(s.out_topic, "edge-ai/bu/fac/gw/ai/inference/vision");
                *results += 1;
            })
        });
        (ingest_allocs, process_allocs)
    };
    // Warm-up: the first frame of a camera is remembered (one map entry).
    one_frame(&mut slot, &mut results);

    // What the decoder allocates on its own for this image.
    let mut scratch_rgb = vec![0u8; 1920 * 1080 * 3];
    let decoder_allocs = allocs_during(|| {
        decode::decode_into(&jpeg, &mut scratch_rgb, 1920, 1080).unwrap();
    });
    for _ in 0..3 {
        let (ingest_allocs, process_allocs) = one_frame(&mut slot, &mut results);
        assert_eq!(
            ingest_allocs, 0,
            "envelope parsing, routing and base64 must not allocate"
        );
        assert_eq!(
            process_allocs, decoder_allocs,
            "decode + camera health + result JSON must allocate only what the decoder does ({decoder_allocs})"
        );
    }
    assert_eq!(results, 4);
    println!("zune-jpeg allocations per 1920x1080 frame: {decoder_allocs}");
}

#[test]
fn preprocess_and_inference_result_do_not_allocate() {
    let pre = Preprocessing {
        width: 640,
        height: 640,
        mode: ResizeMode::Letterbox { pad_value: 114 },
        filter: ResizeFilter::Bilinear,
        normalize: true,
        mean: [0.0; 3],
        std: [1.0; 3],
        channel_order: ChannelOrder::Rgb,
        layout: Layout::Nchw,
    };
    let mut rgb = vec![0u8; 1920 * 1080 * 3];
    decode::decode_into(&jpeg(), &mut rgb, 1920, 1080).unwrap();
    let mut tensor = vec![0f32; preprocess::tensor_len(&pre)];
    let mut scratch = preprocess::Scratch::with_capacity(640);
    let mut out = Vec::with_capacity(64 * 1024);
    let preds = [
        Prediction {
            class_id: 0,
            label: "person",
            confidence: 0.9,
            bbox: Some([1.0, 2.0, 3.0, 4.0]),
            zones: 0,
            track_id: None,
        },
        Prediction {
            class_id: 15,
            label: "cat",
            confidence: 0.5,
            bbox: None,
            zones: 0,
            track_id: None,
        },
    ];
    let src = result::Source {
        device_id: Some("cam"),
        form: "raw_jpeg",
        topic: "t",
        timestamp_json: None,
        correlation_id_json: Some(b"\"c\""),
        location_json: None,
        metadata_json: None,
    };
    let placement = ai_edge_inference::backend::Placement::cpu();
    let run = |tensor: &mut Vec<f32>, scratch: &mut preprocess::Scratch, out: &mut Vec<u8>| {
        let g = preprocess::Geometry::new(1920, 1080, &pre);
        preprocess::preprocess_into(&rgb, &g, &pre, scratch, tensor);
        result::write_inference(
            out,
            SystemTime::now(),
            &src,
            "m",
            result::Ran {
                backend_used: "onnx",
                placement: &placement,
            },
            &Timings::default(),
            &decode::Decoded {
                width: 1920,
                height: 1080,
                ..Default::default()
            },
            preds.iter().copied(),
            true,
            result::Zoning::NONE,
        );
    };
    run(&mut tensor, &mut scratch, &mut out);
    for _ in 0..3 {
        assert_eq!(allocs_during(|| run(&mut tensor, &mut scratch, &mut out)), 0);
    }
    // Letterbox padding rows hold 114/255.
    assert!((tensor[0] - 114.0 / 255.0).abs() < 1e-6);
}

#[test]
fn antialiased_resize_does_not_allocate_with_scratch_sized_at_start() {
    let mut rgb = vec![0u8; 1920 * 1080 * 3];
    decode::decode_into(&jpeg(), &mut rgb, 1920, 1080).unwrap();
    for filter in [
        ResizeFilter::BilinearAntialias,
        ResizeFilter::Bicubic,
        ResizeFilter::Area,
    ] {
        for (size, mode) in [
            (224, ResizeMode::CenterCrop { resize_short: 256 }),
            (640, ResizeMode::Letterbox { pad_value: 114 }),
        ] {
            let pre = Preprocessing {
                width: size,
                height: size,
                mode,
                filter,
                normalize: true,
                mean: [0.0; 3],
                std: [1.0; 3],
                channel_order: ChannelOrder::Rgb,
                layout: Layout::Nchw,
            };
            let mut tensor = vec![0f32; preprocess::tensor_len(&pre)];
            // As a worker's slot: sized for the largest frame and input at start.
            let mut scratch = preprocess::Scratch::for_frames(1920, 1920, 640, 640);
            let g = preprocess::Geometry::new(1920, 1080, &pre);
            for _ in 0..2 {
                let n = allocs_during(|| preprocess::preprocess_into(&rgb, &g, &pre, &mut scratch, &mut tensor));
                assert_eq!(n, 0, "{filter:?} {mode:?}");
            }
        }
    }
}
