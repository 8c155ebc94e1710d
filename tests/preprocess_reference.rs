//! The service's input tensor against the reference pipelines' own code, from
//! the same decoded pixels (lossless PNGs that Pillow decoded from the JPEG
//! fixtures, some resized to awkward sizes): Pillow's resize + torchvision's
//! crop for classifiers (every Pillow filter), OpenCV's letterbox as
//! Ultralytics writes it for YOLO. Compared before normalisation: within one
//! grey level (1/255), max abs, on every pixel.
//!
//! Needs Python with Pillow, numpy and opencv-python-headless: `tests/run`
//! installs them into `target/ref-pkgs` (AEI_REFERENCE_PYTHONPATH).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{binary, root, TempDir};

/// Python with the reference packages on its path.
fn python() -> Command {
    let path = std::env::var_os("AEI_REFERENCE_PYTHONPATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/ref-pkgs"));
    assert!(
        path.exists(),
        "{} is missing: run `bash tests/run` (it installs Pillow, OpenCV and onnxruntime there) \
         or set AEI_REFERENCE_PYTHONPATH",
        path.display()
    );
    let mut c = Command::new(std::env::var_os("AEI_REFERENCE_PYTHON").unwrap_or_else(|| "python3".into()));
    c.env("PYTHONPATH", path);
    c
}

fn reference(args: &[&str]) {
    let out = python()
        .arg(root().join("tests/reference/preprocess.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "preprocess.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The service's tensor for `image` under `preprocessing` (NHWC, 0..255).
fn tensor(dir: &TempDir, preprocessing: &str, image: &Path) -> Vec<f32> {
    let config = dir.write(
        "model.yaml",
        &format!(
            "name: probe\nbackend: candle\nmodel_type: image-classification\nmodel_path: {}\n\
             preprocessing: {{ {preprocessing}, normalize: false, mean: [0, 0, 0], std: [1, 1, 1], layout: nhwc }}\n",
            root().join("models/efficientnet-lite0.safetensors").display()
        ),
    );
    let out_path = dir.0.join("tensor.bin");
    let out = binary()
        .args(["tensor", image.to_str().unwrap(), "--out", out_path.to_str().unwrap()])
        .env("MODEL_CONFIG_PATH", &config)
        .env("MAX_IMAGE_WIDTH", "4096")
        .env("MAX_IMAGE_HEIGHT", "4096")
        .output()
        .unwrap();
    assert!(out.status.success(), "tensor: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&out_path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// (max abs, mean abs) between the tensor and the reference's uint8 image.
fn diff(t: &[f32], reference: &[u8]) -> (f32, f32) {
    assert_eq!(t.len(), reference.len());
    let mut max = 0f32;
    let mut sum = 0f64;
    for (a, b) in t.iter().zip(reference) {
        let d = (a - *b as f32).abs();
        max = max.max(d);
        sum += d as f64;
    }
    (max, (sum / t.len() as f64) as f32)
}

/// Lossless inputs: Pillow's decode of each JPEG fixture, and a few awkward sizes.
fn inputs(dir: &TempDir) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for (photo, size) in [
        ("chelsea.jpg", None),
        ("coffee.jpg", Some("768x576")),
        ("astronaut.jpg", None),
        ("rocket-1080p.jpg", None),
        ("chelsea.jpg", Some("transpose")),
        ("coffee.jpg", Some("1001x667")),
        ("camera-gray.jpg", Some("227x225")),
    ] {
        let name = format!("{photo}{}", size.map(|s| format!("@{s}")).unwrap_or_default());
        let png = dir.0.join(format!("{}.png", v.len()));
        let src = root().join("tests/fixtures").join(photo);
        let mut args = vec!["decode", src.to_str().unwrap(), png.to_str().unwrap()];
        args.extend(size);
        reference(&args);
        v.push((name, png));
    }
    v
}

#[test]
fn classifier_crops_match_pillow_and_torchvision_for_every_filter() {
    let dir = TempDir::new("pre-ref-crop");
    let inputs = inputs(&dir);
    let refbin = dir.0.join("ref.bin");
    let mut worst = 0f32;
    for (name, png) in &inputs {
        for filter in ["bilinear-antialias", "bicubic", "area", "nearest"] {
            reference(&[
                "crop",
                filter,
                "256",
                "224",
                png.to_str().unwrap(),
                refbin.to_str().unwrap(),
            ]);
            let t = tensor(
                &dir,
                &format!("resize: [224, 224], mode: center-crop, resize_short: 256, resize_filter: {filter}"),
                png,
            );
            let (max, mean) = diff(&t, &std::fs::read(&refbin).unwrap());
            println!("crop {filter:<18} {name:<24} max {max:.3} mean {mean:.4}");
            assert!(
                max <= 1.0,
                "{name}, {filter}: max abs {max} grey levels from Pillow/torchvision"
            );
            worst = worst.max(max);
        }
    }
    println!("worst: {worst}");
}

#[test]
fn yolo_letterbox_matches_opencv_and_ultralytics() {
    let dir = TempDir::new("pre-ref-letterbox");
    let inputs = inputs(&dir);
    let refbin = dir.0.join("ref.bin");
    for (name, png) in &inputs {
        for size in ["640", "320"] {
            reference(&["letterbox", size, png.to_str().unwrap(), refbin.to_str().unwrap()]);
            let t = tensor(
                &dir,
                &format!("resize: [{size}, {size}], mode: letterbox, resize_filter: bilinear"),
                png,
            );
            let (max, mean) = diff(&t, &std::fs::read(&refbin).unwrap());
            println!("letterbox {size} {name:<24} max {max:.3} mean {mean:.4}");
            assert!(
                max <= 1.0,
                "{name} at {size}: max abs {max} grey levels from OpenCV/Ultralytics"
            );
        }
    }
}

/// Not a resize check: how far zune-jpeg's decode is from libjpeg-turbo's
/// (Pillow's), the figure the end-to-end tolerances absorb. The service's
/// pixels come from `tensor` with an identity resize (stretch, nearest, same size).
#[test]
fn zune_jpeg_decodes_within_a_few_grey_levels_of_libjpeg_turbo() {
    let dir = TempDir::new("pre-ref-decode");
    for (photo, w, h) in [
        ("chelsea.jpg", 451, 300),
        ("chelsea-progressive.jpg", 451, 300),
        ("coffee.jpg", 600, 400),
        ("astronaut.jpg", 512, 512),
        ("camera-gray.jpg", 512, 512),
        ("rocket-1080p.jpg", 1920, 1080),
        ("formats/cat-420.jpg", 120, 80),
        ("formats/cat-422.jpg", 120, 80),
        ("formats/cat-444.jpg", 120, 80),
        ("formats/cat-restart.jpg", 120, 80),
        ("formats/cat-cmyk.jpg", 120, 80),
    ] {
        let src = root().join("tests/fixtures").join(photo);
        let png = dir.0.join("pillow.png");
        let refbin = dir.0.join("ref.bin");
        reference(&["decode", src.to_str().unwrap(), png.to_str().unwrap()]);
        // Pillow's pixels, through an identity crop (the crop of the whole image).
        let side = w.min(h);
        reference(&[
            "crop",
            "nearest",
            &side.to_string(),
            &side.to_string(),
            png.to_str().unwrap(),
            refbin.to_str().unwrap(),
        ]);
        let t = tensor(
            &dir,
            &format!("resize: [{side}, {side}], mode: center-crop, resize_short: {side}, resize_filter: nearest"),
            &src,
        );
        let (max, mean) = diff(&t, &std::fs::read(&refbin).unwrap());
        println!("decode {photo:<26} max {max:.0} mean {mean:.3} (zune-jpeg against libjpeg-turbo)");
        assert!(mean < 1.5, "{photo}: mean {mean} grey levels from libjpeg-turbo");
    }
}
