//! The command line: parses arguments and hands over to `service`.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::process::ExitCode;

use ai_edge_inference::config::{self, Settings};
use ai_edge_inference::{alloc_count, bench, build_info, logging, service};

#[global_allocator]
static ALLOC: alloc_count::CountingAlloc = alloc_count::CountingAlloc;

const USAGE: &str = "\
Usage: ai-edge-inference [COMMAND] [OPTIONS]

Commands:
  run                     Run the service (the default): MQTT in, results out, HTTP probes
  infer FILE... [--model NAME] [--annotate OUT.jpg|DIR]
                          Run image files through a model once and print JSON results;
                          --annotate also writes each with its detections drawn on it
  check-config [PATH]     Validate model config(s) and print the effective configuration
  convert IN OUT [--dtype f16|f32]
                          Checkpoint (.pth, legacy or zip; .safetensors) -> safetensors for Candle
  tensor FILE --out PATH [--model NAME]
                          Write the preprocessed model input for FILE as raw f32 (little-endian)
  bench decode FILE [--iters N] [--size S]
                          Time JPEG decode + letterbox preprocess to SxS (default 640)
  bench model FILE [--model NAME] [--iters N] [--layers N]
                          Time one model's backend on FILE's tensor (median, p99)
  bench gemm [--iters N]
                          The Candle kernels' GEMM against the gemm crate on convolution shapes
  bench layouts [--iters N]
                          NCHW against NHWC kernels on EfficientNet-Lite0's shapes (candle-graph builds)
  bench mqtt FILE --topic T --result-topic R [--iters N]
                          Time publish -> result through a running service and the broker
  --version               Print build facts
  --help                  Print this help

Options (flags override environment variables):
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}{}", config::help_text());
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("{}", build_info::line());
        return ExitCode::SUCCESS;
    }
    let (settings, rest) = match Settings::from_env_and_args(|k| std::env::var(k).ok(), &args) {
        Ok(s) => s,
        Err(e) => return fail(&format!("configuration: {e}")),
    };
    logging::init(&settings.log, settings.log_format);

    let (cmd, rest) = match rest.split_first() {
        Some((c, r)) => (c.as_str(), r),
        None => ("run", &[][..]),
    };
    match cmd {
        "run" if rest.is_empty() => match service::run(settings) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        },
        "infer" => {
            let (model, rest) = take_flag(rest, "--model");
            let (annotate, files) = take_flag(&rest, "--annotate");
            if files.is_empty() {
                return fail("infer: name at least one image file");
            }
            match service::infer_files(&settings, model.as_deref(), &files, annotate.as_deref()) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => fail(&e),
            }
        }
        "check-config" if rest.len() <= 1 => match service::check_config(&settings, rest.first().map(String::as_str)) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        "convert" => {
            let (dtype, files) = take_flag(rest, "--dtype");
            match files.as_slice() {
                [input, output] => match ai_edge_inference::backend::convert(
                    std::path::Path::new(input),
                    std::path::Path::new(output),
                    dtype.as_deref().unwrap_or("f32"),
                ) {
                    Ok(text) => {
                        eprint!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                _ => fail("convert: name the input checkpoint and the output .safetensors"),
            }
        }
        "tensor" => {
            let (out, rest) = take_flag(rest, "--out");
            let (model, files) = take_flag(&rest, "--model");
            match (out, files.as_slice()) {
                (Some(out), [file]) => match service::dump_tensor(&settings, model.as_deref(), file, &out) {
                    Ok(text) => {
                        eprint!("{text}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => fail(&e),
                },
                _ => fail("tensor: name one image file and --out PATH"),
            }
        }
        "bench" if !rest.is_empty() => {
            let (iters, r) = take_flag(&rest[1..], "--iters");
            let iters = match number(iters, "--iters", 50usize, 1, 1_000_000) {
                Ok(n) => n,
                Err(e) => return fail(&e),
            };
            let report = match rest[0].as_str() {
                "decode" => {
                    let (size, r) = take_flag(&r, "--size");
                    let (mode, r) = take_flag(&r, "--mode");
                    let (filter, files) = take_flag(&r, "--filter");
                    match (number(size, "--size", 640u32, 8, 8192), files.as_slice()) {
                        (Err(e), _) => Err(e),
                        (Ok(size), [file]) => bench::bench_decode(
                            file,
                            iters,
                            size,
                            mode.as_deref().unwrap_or("letterbox"),
                            filter.as_deref(),
                        ),
                        _ => Err("bench decode: name one image file".into()),
                    }
                }
                "gemm" => match r.as_slice() {
                    [] => bench::bench_gemm(&settings, iters),
                    _ => Err("bench gemm: takes no file".into()),
                },
                "layouts" => match r.as_slice() {
                    [] => bench::bench_layouts(&settings, iters),
                    _ => Err("bench layouts: takes no file".into()),
                },
                "model" => {
                    let (model, r) = take_flag(&r, "--model");
                    let (layers, files) = take_flag(&r, "--layers");
                    match (number(layers, "--layers", 12usize, 0, 100_000), files.as_slice()) {
                        (Err(e), _) => Err(e),
                        (Ok(layers), [file]) => bench::bench_model(&settings, model.as_deref(), file, iters, layers),
                        _ => Err("bench model: name one JPEG file".into()),
                    }
                }
                "mqtt" => {
                    let (topic, r) = take_flag(&r, "--topic");
                    let (result, files) = take_flag(&r, "--result-topic");
                    match (topic, result, files.as_slice()) {
                        (Some(t), Some(rt), [file]) => bench::bench_mqtt(&settings, file, &t, &rt, iters),
                        _ => Err("bench mqtt: name one JPEG file, --topic and --result-topic".into()),
                    }
                }
                other => Err(format!(
                    "unknown benchmark `{other}` (decode, model, gemm, layouts, mqtt)"
                )),
            };
            match report {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        _ => fail(&format!("cannot understand `{}` (see --help)", args.join(" "))),
    }
}

/// Splits `--flag VALUE` out of `args`.
fn take_flag(args: &[String], flag: &str) -> (Option<String>, Vec<String>) {
    let mut value = None;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == flag {
            value = it.next().cloned();
        } else if let Some(v) = a.strip_prefix(flag).and_then(|v| v.strip_prefix('=')) {
            value = Some(v.to_owned());
        } else {
            rest.push(a.clone());
        }
    }
    (value, rest)
}

/// A whole-number flag: its default when absent, an error naming it when not a number in `min..=max`.
fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    value: Option<String>,
    flag: &str,
    default: T,
    min: T,
    max: T,
) -> Result<T, String> {
    let Some(v) = value else { return Ok(default) };
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(n),
        _ => Err(format!("{flag}: expected a whole number in {min}..={max}, found `{v}`")),
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}
