//! Every image format and variant a camera or the media connector sends,
//! decoded from the files `tests/fixtures/make_images.py` made: lossless files
//! of one picture must give the same pixels exactly, JPEG variants the truth
//! within a JPEG's error, and EXIF orientations the upright picture.

mod support;

use ai_edge_inference::decode::{self, DecodeError, Decoded, Format, BUFFER_BYTES_PER_PIXEL};
use support::{binary, fixture, root};

const MAX: (u32, u32) = (1024, 1024);

fn file(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/formats").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Decoded and turned upright, as the service does; the RGB8 pixels.
fn pixels(name: &str) -> (Decoded, Vec<u8>) {
    let n = MAX.0 as usize * MAX.1 as usize;
    let mut rgb = vec![0u8; n * BUFFER_BYTES_PER_PIXEL];
    let mut spare = vec![0u8; n * 3];
    let mut d = decode::decode_into(&file(name), &mut rgb, MAX.0, MAX.1).unwrap_or_else(|e| panic!("{name}: {e}"));
    let stored = d;
    decode::orient(&mut rgb, &mut spare, &mut d);
    rgb.truncate(d.rgb_len());
    (
        Decoded {
            orientation: stored.orientation,
            ..d
        },
        rgb,
    )
}

fn mean_abs(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).abs()).sum::<f64>() / a.len() as f64
}

#[test]
fn lossless_files_of_one_picture_decode_to_the_same_pixels() {
    let (d, truth) = pixels("cat.png");
    assert_eq!((d.width, d.height, d.format), (120, 80, Format::Png));
    for (name, format) in [
        ("cat.bmp", Format::Bmp),
        ("cat.tif", Format::Tiff),
        ("cat-lzw.tif", Format::Tiff),
        ("cat-deflate.tif", Format::Tiff),
        ("cat-packbits.tif", Format::Tiff),
        ("cat-bigendian.tif", Format::Tiff),
        ("cat-interlaced.png", Format::Png),
        // Alpha is dropped: the RGB under it is the picture.
        ("cat-rgba.png", Format::Png),
        ("cat-rgba.bmp", Format::Bmp),
        ("cat-rgba.tif", Format::Tiff),
        // 16 bits a sample: the high byte.
        ("cat-rgb16.png", Format::Png),
        ("cat-rgb16.tif", Format::Tiff),
    ] {
        let (d, rgb) = pixels(name);
        assert_eq!((d.width, d.height, d.format), (120, 80, format), "{name}");
        assert!(d.orientation.is_identity(), "{name}");
        assert!(rgb == truth, "{name}: {} of the pixels differ", mean_abs(&rgb, &truth));
    }

    let (_, gray) = pixels("gray.png");
    assert!(
        gray.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]),
        "grey repeats into R, G and B"
    );
    for name in ["gray.bmp", "gray.tif", "gray16.png", "gray16.tif", "gray-alpha.png"] {
        let (d, rgb) = pixels(name);
        assert_eq!((d.width, d.height), (120, 80), "{name}");
        assert!(rgb == gray, "{name}");
    }

    let (_, palette) = pixels("palette.png");
    for name in ["palette.bmp", "palette-trns.png"] {
        assert!(pixels(name).1 == palette, "{name}");
    }
    // Quantised pictures of the cat: near the truth, not equal to it.
    assert!(mean_abs(&palette, &truth) < 6.0);
    let (d, p16) = pixels("palette16.png");
    assert_eq!((d.width, d.height), (120, 80));
    assert!(mean_abs(&p16, &truth) < 15.0, "{}", mean_abs(&p16, &truth));
}

#[test]
fn jpeg_variants_decode_to_the_picture() {
    let (_, truth) = pixels("cat.png");
    let (_, gray) = pixels("gray.png");
    for name in [
        "cat-420.jpg",
        "cat-422.jpg",
        "cat-444.jpg",
        "cat-progressive.jpg",
        "cat-restart.jpg",
        "cat-cmyk.jpg",
    ] {
        let (d, rgb) = pixels(name);
        assert_eq!((d.width, d.height, d.format), (120, 80, Format::Jpeg), "{name}");
        // Quality 95: a mean error of a grey level or two (an inverted CMYK would be ~100).
        let e = mean_abs(&rgb, &truth);
        assert!(e < 3.0, "{name}: mean error {e}");
    }
    let (_, rgb) = pixels("cat-gray.jpg");
    assert!(mean_abs(&rgb, &gray) < 2.0);
}

#[test]
fn exif_orientations_turn_the_picture_upright() {
    let (_, truth) = pixels("cat.png");
    for n in 2..=8u8 {
        for ext in ["png", "jpg", "tif"] {
            if ext == "tif" && n != 6 && n != 8 {
                continue;
            }
            let name = format!("cat-exif{n}.{ext}");
            let (d, rgb) = pixels(&name);
            assert_eq!(d.orientation.exif(), n, "{name}");
            assert_eq!((d.width, d.height), (120, 80), "{name} is upright");
            let e = mean_abs(&rgb, &truth);
            if ext == "jpg" {
                assert!(e < 3.0, "{name}: mean error {e}");
            } else {
                assert!(rgb == truth, "{name}: mean error {e}");
            }
        }
    }
}

#[test]
fn sizes_are_checked_from_the_header_and_damage_is_an_error() {
    let mut rgb = vec![0u8; 100 * 100 * BUFFER_BYTES_PER_PIXEL];
    for (name, format) in [
        ("cat.png", Format::Png),
        ("cat.bmp", Format::Bmp),
        ("cat-lzw.tif", Format::Tiff),
        ("cat-444.jpg", Format::Jpeg),
    ] {
        let bytes = file(name);
        match decode::decode_into(&bytes, &mut rgb, 100, 100) {
            Err(DecodeError::TooLarge {
                width: 120, height: 80, ..
            }) => {}
            other => panic!("{name}: {other:?}"),
        }
        // Every cut: an error naming the format (or, for formats that end in
        // padding, the picture), never a panic.
        let mut big = vec![0u8; 200 * 200 * BUFFER_BYTES_PER_PIXEL];
        let (mut cuts, mut refused) = (0, 0);
        for cut in (0..bytes.len()).step_by(97) {
            cuts += 1;
            match decode::decode_into(&bytes[..cut], &mut big, 200, 200) {
                Ok(_) => {}
                Err(DecodeError::UnknownFormat(_)) => refused += 1,
                Err(DecodeError::Corrupt(f, _)) => {
                    assert_eq!(f, format, "{name} cut at {cut}");
                    refused += 1;
                }
                Err(e) => panic!("{name} cut at {cut}: {e}"),
            }
        }
        println!("{name}: {refused} of {cuts} cuts refused");
        assert!(
            refused * 10 >= cuts * 9,
            "{name}: only {refused} of {cuts} cuts refused"
        );
    }
    match decode::decode_into(b"GIF89a\x01\0\x01\0", &mut rgb, 100, 100) {
        Err(DecodeError::UnknownFormat(what)) => assert_eq!(what, "it is a GIF"),
        other => panic!("{other:?}"),
    }
}

/// The `infer` command on the default model: a PNG is answered like the JPEG
/// it was made from, and a turned picture says it was turned. (The default
/// build's default is the embedded classifier; the minimal build's, camera health.)
#[test]
fn the_service_infers_every_format_and_says_what_it_turned() {
    let infer = |path: &str| -> miniserde::json::Value {
        let out = binary().args(["infer", path]).current_dir(root()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{path}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        miniserde::json::from_str(text.lines().next().unwrap()).unwrap()
    };
    // The classifier's top label, or camera health's verdict.
    let answer = |v: &miniserde::json::Value| match support::get(v, &["predictions"]) {
        Some(miniserde::json::Value::Array(a)) if !a.is_empty() => support::get_str(&a[0], &["label"]).unwrap(),
        _ => format!(
            "{:?} {}",
            support::get_bool(v, &["health", "black_frame"]),
            support::num(support::get(v, &["health", "width"]).unwrap())
        ),
    };
    let reference = infer("tests/fixtures/formats/cat.png");
    assert_eq!(
        support::get_str(&reference, &["metadata", "image_format"]).as_deref(),
        Some("png")
    );
    assert!(support::get(&reference, &["metadata", "orientation"]).is_none());
    for (path, format) in [
        ("cat.bmp", "bmp"),
        ("cat-lzw.tif", "tiff"),
        ("cat-444.jpg", "jpeg"),
        ("cat-exif6.png", "png"),
        ("cat-exif8.tif", "tiff"),
    ] {
        let v = infer(&format!("tests/fixtures/formats/{path}"));
        assert_eq!(answer(&v), answer(&reference), "{path}");
        assert_eq!(
            support::get_str(&v, &["metadata", "image_format"]).as_deref(),
            Some(format)
        );
        if let Some(w) = support::get(&v, &["metadata", "image_width"]) {
            assert_eq!(support::num(w), 120.0, "{path}");
        }
    }
    let v = infer("tests/fixtures/formats/cat-exif6.png");
    assert_eq!(
        support::num(support::get(&v, &["metadata", "orientation", "exif"]).unwrap()),
        6.0
    );
    assert_eq!(
        support::num(support::get(&v, &["metadata", "orientation", "rotated_degrees"]).unwrap()),
        90.0
    );
    assert_eq!(
        support::get_bool(&v, &["metadata", "orientation", "mirrored"]),
        Some(false)
    );
    let v = infer("tests/fixtures/formats/cat-exif7.png");
    assert_eq!(
        support::get_bool(&v, &["metadata", "orientation", "mirrored"]),
        Some(true)
    );
    assert!(fixture("astronaut-exif6.jpg").len() > 1000);
}

/// A worker's two pixel buffers trade places when a picture is turned upright;
/// the next frame, an RGBA PNG as large as the slots allow, still fits.
#[test]
fn after_a_turned_picture_the_next_rgba_frame_still_fits() {
    use ai_edge_inference::frame::{Limits, Slot};
    let mut slot = Slot::new(&Limits {
        max_payload: 1 << 16,
        max_width: 120,
        max_height: 80,
        max_tensor: 0,
        max_input_width: 0,
        max_picture: 0,
    });
    let mut d = decode::decode_into(&file("cat-exif6.png"), &mut slot.rgb, 120, 120).unwrap();
    decode::orient(&mut slot.rgb, &mut slot.rgb_spare, &mut d);
    assert_eq!((d.width, d.height), (120, 80));
    let d = decode::decode_into(&file("cat-rgba.png"), &mut slot.rgb, 120, 80).unwrap();
    assert_eq!(slot.rgb[..d.rgb_len()], pixels("cat.png").1[..]);
}
