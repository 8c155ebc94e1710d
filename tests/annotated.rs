//! Annotated pictures end to end, YOLOv12n on ONNX Runtime (`models/fetch`): `infer --annotate`
//! and `POST /infer?annotate=true` answer JPEGs that decode to the original frame's size with
//! each detection's box drawn where its result says, in its class colour (checked pixel by
//! pixel against the original, so a colour already there does not pass for a drawn one).
#![cfg(feature = "onnx")]

mod support;

use ai_edge_inference::annotate;
use miniserde::json::Value;
use support::*;

fn yolo_config(dir: &TempDir) -> std::path::PathBuf {
    let text = std::fs::read_to_string(root().join("models/yolov12n.yaml")).unwrap();
    let model = root().join("models/.cache/yolov12n.onnx");
    dir.write(
        "yolo.yaml",
        &text.replace(
            "model_path: .cache/yolov12n.onnx",
            &format!("model_path: {}", model.display()),
        ),
    )
}

/// Decoded RGB8 and its size.
fn decode(jpeg: &[u8]) -> (Vec<u8>, u32, u32) {
    assert_eq!(&jpeg[..2], b"\xff\xd8", "a JPEG");
    let mut rgb = vec![0u8; 4096 * 4096 * 4];
    let d = ai_edge_inference::decode::decode_into(jpeg, &mut rgb, 4096, 4096).unwrap();
    rgb.truncate(d.width as usize * d.height as usize * 3);
    (rgb, d.width, d.height)
}

fn near(a: &[u8], c: [u8; 3]) -> bool {
    a.iter().zip(c).all(|(&x, y)| (x as i32 - y as i32).abs() <= 48)
}

/// Checks that the left and right edges of every box in `result` carry its class colour in the
/// picture where the original does not: at least 80 % of the pixels sampled down the middle
/// of each edge. Returns how many boxes were checked.
fn check_boxes(result: &Value, picture: &[u8], original: &[u8]) -> usize {
    let (drawn, w, h) = decode(picture);
    let (orig, ow, oh) = decode(original);
    assert_eq!((w, h), (ow, oh), "the picture is the frame's size");
    let Some(Value::Array(preds)) = get(result, &["predictions"]) else {
        panic!("{result:?}")
    };
    let t = annotate::line_width(w, h) as i64;
    let mut checked = 0;
    for p in preds {
        let Some(Value::Array(b)) = get(p, &["bbox"]) else {
            panic!("{p:?}")
        };
        let b: Vec<f64> = b.iter().map(num).collect();
        let class = num(get(p, &["class_id"]).unwrap()) as usize;
        let colour = annotate::colour(class);
        let (x0, y0, x1, y1) = (
            b[0].round() as i64,
            b[1].round() as i64,
            b[2].round() as i64,
            b[3].round() as i64,
        );
        let (x0, x1) = (x0.clamp(0, w as i64 - 1), x1.clamp(0, w as i64 - 1));
        // The middle of the edges' height, away from labels and corners.
        let (ya, yb) = (y0 + (y1 - y0) / 3, y1 - (y1 - y0) / 3);
        if yb - ya < 4 {
            continue;
        }
        for x in [x0 + t / 2, x1 - t / 2] {
            let (mut hit, mut was, mut n) = (0, 0, 0);
            for y in ya..yb {
                let i = ((y.clamp(0, h as i64 - 1) * w as i64 + x) * 3) as usize;
                hit += near(&drawn[i..i + 3], colour) as u32;
                was += near(&orig[i..i + 3], colour) as u32;
                n += 1;
            }
            assert!(
                hit * 5 >= n * 4,
                "{p:?}: {hit} of {n} pixels down x={x} are the class colour {colour:?}"
            );
            assert!(was * 2 < n, "{p:?}: the original already had the colour at x={x}");
        }
        checked += 1;
    }
    checked
}

#[test]
fn infer_annotate_draws_each_box_where_the_result_says() {
    let dir = TempDir::new("annotate-cli");
    let cfg = yolo_config(&dir);
    let out = dir.0.join("pictures");
    std::fs::create_dir(&out).unwrap();
    // A person, a cup with a spoon on a table, and a 1080p frame with nothing COCO knows.
    let files = [
        "tests/fixtures/astronaut.jpg",
        "tests/fixtures/coffee.jpg",
        "tests/fixtures/rocket-1080p.jpg",
    ];
    let o = binary()
        .args([
            "infer",
            files[0],
            files[1],
            files[2],
            "--annotate",
            out.to_str().unwrap(),
        ])
        .env("MODEL_CONFIG_PATH", &cfg)
        .env("ORT_DYLIB_PATH", ort_library())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| miniserde::json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "one result per file");
    let mut boxes = 0;
    for (f, r) in files.iter().zip(&lines) {
        let stem = std::path::Path::new(f).file_stem().unwrap().to_str().unwrap();
        let picture = std::fs::read(out.join(format!("{stem}.annotated.jpg"))).unwrap();
        boxes += check_boxes(r, &picture, &fixture(f.trim_start_matches("tests/fixtures/")));
    }
    assert!(boxes >= 3, "the fixtures have detections to check ({boxes})");

    // One file: the path is the picture's; several into a missing directory: a clear error.
    let one = dir.0.join("one.jpg");
    let o = binary()
        .args(["infer", files[0], "--annotate", one.to_str().unwrap()])
        .env("MODEL_CONFIG_PATH", &cfg)
        .env("ORT_DYLIB_PATH", ort_library())
        .output()
        .unwrap();
    assert!(o.status.success());
    decode(&std::fs::read(&one).unwrap());
    let o = binary()
        .args(["infer", files[0], files[1], "--annotate", "/nonexistent/dir"])
        .env("MODEL_CONFIG_PATH", &cfg)
        .env("ORT_DYLIB_PATH", ort_library())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("name an existing directory"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn post_infer_annotate_answers_the_picture() {
    let dir = TempDir::new("annotate-http");
    let cfg = yolo_config(&dir);
    let ort = ort_library();
    let s = Service::start(&[
        ("AIO_BROKER_HOSTNAME", ""),
        ("MODEL_CONFIG_PATH", cfg.to_str().unwrap()),
        ("ORT_DYLIB_PATH", ort.to_str().unwrap()),
        ("MODEL_WATCH_S", "0"),
    ]);
    s.wait_ready();
    let jpeg = fixture("astronaut.jpg");
    let (code, json) = http_request(s.admin(), "POST", "/infer", &jpeg);
    assert_eq!(code, 200);
    let result: Value = miniserde::json::from_str(std::str::from_utf8(&json).unwrap()).unwrap();
    let (code, picture) = http_request(s.admin(), "POST", "/infer?annotate=true", &jpeg);
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&picture));
    // The same model on the same frame: the boxes of the JSON answer are in the picture.
    assert!(check_boxes(&result, &picture, &jpeg) >= 1);
    assert_eq!(s.metric("aei_pictures_total{outcome=\"drawn\"}"), 1.0);

    // A bad value, and a corrupt frame: JSON errors, not pictures.
    let (code, body) = http_request(s.admin(), "POST", "/infer?annotate=yes", &jpeg);
    assert_eq!(code, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("expected true or false"));
    let (code, body) = http_request(s.admin(), "POST", "/infer?annotate=true", b"\xff\xd8\xff\xdb broken");
    assert!((400..500).contains(&code), "{code}");
    assert!(
        String::from_utf8_lossy(&body).contains("corrupt"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}
