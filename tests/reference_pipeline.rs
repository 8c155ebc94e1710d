//! End to end from the JPEG fixtures, the service's answers against the
//! reference pipelines run as their users run them (tests/reference/pipeline.py:
//! Pillow + torchvision's resize and crop + onnxruntime for EfficientNet-Lite0;
//! OpenCV + Ultralytics' letterbox, decode and NMS + onnxruntime for YOLOv12n),
//! on the same ONNX files and thresholds. The JPEG decoders differ (zune-jpeg
//! against libjpeg-turbo), and so by a little do the tensors; the answers must
//! not: the same top-1 class with a probability within 0.02, and the same
//! detections, matched one to one at IoU >= 0.95. On both backends.
//!
//! Needs `bash models/fetch` and the reference packages `tests/run` installs.
#![cfg(feature = "onnx")]

mod support;

use std::path::PathBuf;
use std::process::Command;

use miniserde::json::Value;
use support::*;

const PHOTOS: &[&str] = &[
    "astronaut.jpg",
    "chelsea.jpg",
    "chelsea-progressive.jpg",
    "coffee.jpg",
    "camera-gray.jpg",
    "rocket-1080p.jpg",
    "astronaut-exif6.jpg",
    "formats/cat-cmyk.jpg",
    "formats/cat-exif8.jpg",
];

fn fixture_path(name: &str) -> String {
    root().join("tests/fixtures").join(name).to_str().unwrap().to_owned()
}

fn reference(args: &[String]) -> Vec<Value> {
    let path = std::env::var_os("AEI_REFERENCE_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/ref-pkgs"));
    assert!(path.exists(), "{}: run `bash tests/run`", path.display());
    let out = Command::new(std::env::var_os("AEI_REFERENCE_PYTHON").unwrap_or_else(|| "python3".into()))
        .env("PYTHONPATH", path)
        .arg(root().join("tests/reference/pipeline.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pipeline.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| miniserde::json::from_str(l).unwrap())
        .collect()
}

/// The service's results for every photo, under `config` (a file in models/).
fn service(config: &str) -> Vec<Value> {
    let files: Vec<String> = PHOTOS.iter().map(|p| fixture_path(p)).collect();
    let out = binary()
        .arg("infer")
        .args(&files)
        .env("MODEL_CONFIG_PATH", root().join("models").join(config))
        .env("ORT_DYLIB_PATH", ort_library())
        .env("MAX_IMAGE_WIDTH", "1920")
        .env("MAX_IMAGE_HEIGHT", "1920")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{config}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = text.lines().map(|l| miniserde::json::from_str(l).unwrap()).collect();
    assert_eq!(v.len(), PHOTOS.len(), "{config}: {text}");
    v
}

fn predictions(v: &Value) -> &[Value] {
    match get(v, &["predictions"]) {
        Some(Value::Array(a)) => a,
        other => panic!("no predictions: {other:?}"),
    }
}

fn classifier(config: &str) {
    let mut args = vec![
        "classify".to_owned(),
        root()
            .join("models/.cache/efficientnet-lite0.onnx")
            .to_str()
            .unwrap()
            .to_owned(),
        root().join("models/imagenet-labels.txt").to_str().unwrap().to_owned(),
    ];
    args.extend(PHOTOS.iter().map(|p| fixture_path(p)));
    let want = reference(&args);
    let got = service(config);
    for ((photo, w), g) in PHOTOS.iter().zip(&want).zip(&got) {
        let top = &predictions(g)[0];
        let (label, prob) = (
            get_str(top, &["label"]).unwrap(),
            num(get(top, &["confidence"]).unwrap()),
        );
        let (wl, wp) = (get_str(w, &["label"]).unwrap(), num(get(w, &["prob"]).unwrap()));
        println!("{config} {photo:<26} service {label} {prob:.4}  reference {wl} {wp:.4}");
        assert_eq!(
            label, wl,
            "{config}, {photo}: top-1 differs from the reference pipeline"
        );
        assert!((prob - wp).abs() <= 0.02, "{config}, {photo}: p {prob} against {wp}");
    }
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
}

fn detector(config: &str) {
    let mut args = vec![
        "detect".to_owned(),
        root().join("models/.cache/yolov12n.onnx").to_str().unwrap().to_owned(),
        "0.25".into(),
        "0.45".into(),
        "100".into(),
    ];
    args.extend(PHOTOS.iter().map(|p| fixture_path(p)));
    let want = reference(&args);
    let got = service(config);
    for ((photo, w), g) in PHOTOS.iter().zip(&want).zip(&got) {
        let want: Vec<(u64, f64, [f64; 4])> = match get(w, &["detections"]) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|d| match d {
                    Value::Array(d) => (num(&d[0]) as u64, num(&d[1]), [2, 3, 4, 5].map(|i| num(&d[i]))),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        };
        let got: Vec<(u64, f64, [f64; 4])> = predictions(g)
            .iter()
            .map(|p| {
                let b = match get(p, &["bbox"]) {
                    Some(Value::Array(b)) => [0, 1, 2, 3].map(|i| num(&b[i])),
                    other => panic!("{other:?}"),
                };
                (
                    num(get(p, &["class_id"]).unwrap()) as u64,
                    num(get(p, &["confidence"]).unwrap()),
                    b,
                )
            })
            .collect();
        println!(
            "{config} {photo:<26} service {} detections, reference {}",
            got.len(),
            want.len()
        );
        assert_eq!(got.len(), want.len(), "{config}, {photo}: {got:?} against {want:?}");
        let mut used = vec![false; got.len()];
        for (cls, conf, bw) in &want {
            let best = got
                .iter()
                .enumerate()
                .filter(|(i, (c, _, _))| !used[*i] && c == cls)
                .map(|(i, (_, _, b))| (i, iou(*b, *bw)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            match best {
                Some((i, v)) if v >= 0.95 => used[i] = true,
                other => {
                    panic!("{config}, {photo}: class {cls} ({conf:.3}) at {bw:?}: best match {other:?} in {got:?}")
                }
            }
        }
    }
}

#[test]
fn efficientnet_on_onnx_runtime_answers_as_the_torchvision_pipeline() {
    classifier("efficientnet-lite0.yaml");
}

#[test]
fn efficientnet_on_candle_answers_as_the_torchvision_pipeline() {
    classifier("efficientnet-lite0-candle.yaml");
}

#[test]
fn yolo_on_onnx_runtime_detects_as_the_ultralytics_pipeline() {
    detector("yolov12n.yaml");
}

#[cfg(feature = "candle-graph")]
#[test]
fn yolo_on_candle_detects_as_the_ultralytics_pipeline() {
    detector("yolov12n-candle.yaml");
}
