//! Trains the shipped sensor model, `models/machine-anomaly.*`, with candle, from a synthetic
//! data set of normal and faulty machine readings (`data.rs`, fixed seeds):
//!
//!   cargo run --release --example train_sensor [-- --out-dir models]
//!
//! A dense autoencoder, 24 -> 16 -> 3 -> 16 -> 24 with ReLU between, takes a window of 8
//! readings of (temperature, vibration, current), each field scaled by the training set's mean
//! and standard deviation, and learns to give it back. It sees only normal windows; a window it
//! cannot reproduce well (a mean squared error above the threshold) is an anomaly. The
//! threshold is the 99.5th percentile of the error on held-out normal windows. The report is
//! precision and recall on a held-out split of normal windows and windows of each fault.
//!
//! Writes `machine-anomaly.safetensors` (what Candle runs), `machine-anomaly.onnx` (the same
//! weights, written by `onnx.rs`, for ONNX Runtime and dual mode) and `machine-anomaly.yaml`
//! (fields, scaling, window, threshold).

mod data;
mod onnx;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};

use data::{Fault, Rng, FIELDS};

const WINDOW: usize = 8;
const LAYERS: [(usize, usize); 4] = [(16, 24), (3, 16), (16, 3), (24, 16)];
const EPOCHS: usize = 150;
const BATCH: usize = 128;
const LR: f64 = 3e-3;

/// Seeds of each split: training, validation (the threshold), test (the report).
const TRAIN: std::ops::Range<u64> = 1..4001;
const VALID: std::ops::Range<u64> = 100_001..101_001;
const TEST_NORMAL: std::ops::Range<u64> = 200_001..201_501;
const TEST_FAULTY: u64 = 300_001;
const FAULTY_PER_KIND: u64 = 500;
const MIN_FAULTY: usize = 3;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn flat(windows: &[Vec<[f32; 3]>]) -> Vec<f32> {
    windows.iter().flat_map(|w| w.iter().flatten().copied()).collect()
}

fn scale(x: &mut [f32], mean: &[f32; 3], std: &[f32; 3]) {
    for (i, v) in x.iter_mut().enumerate() {
        *v = (*v - mean[i % 3]) / std[i % 3];
    }
}

struct Net {
    w: Vec<Var>,
    b: Vec<Var>,
}

impl Net {
    fn new(rng: &mut Rng, dev: &Device) -> R<Net> {
        let (mut w, mut b) = (Vec::new(), Vec::new());
        for (out, inp) in LAYERS {
            // He (Kaiming) uniform for ReLU layers.
            let bound = (6.0 / inp as f64).sqrt();
            let v: Vec<f32> = (0..out * inp).map(|_| rng.range(-bound, bound) as f32).collect();
            w.push(Var::from_tensor(&Tensor::from_vec(v, (out, inp), dev)?)?);
            b.push(Var::zeros(out, DType::F32, dev)?);
        }
        Ok(Net { w, b })
    }

    fn forward(&self, x: &Tensor) -> R<Tensor> {
        let mut h = x.clone();
        for i in 0..LAYERS.len() {
            h = h
                .matmul(&self.w[i].as_tensor().t()?)?
                .broadcast_add(self.b[i].as_tensor())?;
            if i + 1 < LAYERS.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Mean squared reconstruction error per row.
    fn errors(&self, x: &Tensor) -> R<Vec<f32>> {
        let y = self.forward(x)?;
        Ok((y - x)?.sqr()?.mean(1)?.to_vec1::<f32>()?)
    }

    fn vars(&self) -> Vec<&Var> {
        self.w.iter().chain(&self.b).collect()
    }
}

fn train(net: &Net, x: &Tensor, rng: &mut Rng) -> R<f32> {
    let n = x.dim(0)?;
    let vars = net.vars();
    let mut m: Vec<Tensor> = vars.iter().map(|v| v.zeros_like()).collect::<Result<_, _>>()?;
    let mut s: Vec<Tensor> = vars.iter().map(|v| v.zeros_like()).collect::<Result<_, _>>()?;
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut step = 0i32;
    let mut last = 0.0;
    for epoch in 0..EPOCHS {
        // Fisher-Yates with the fixed-seed generator.
        for i in (1..n).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let lr = LR * (1.0 - epoch as f64 / EPOCHS as f64).max(0.05);
        let mut total = 0.0;
        for chunk in order.chunks(BATCH) {
            let idx = Tensor::new(chunk, x.device())?;
            let xb = x.index_select(&idx, 0)?;
            let loss = (net.forward(&xb)? - &xb)?.sqr()?.mean_all()?;
            total += loss.to_scalar::<f32>()? * chunk.len() as f32;
            let grads = loss.backward()?;
            step += 1;
            let (c1, c2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
            for (k, v) in vars.iter().enumerate() {
                let g = grads.get(v.as_tensor()).ok_or("no gradient")?;
                m[k] = ((&m[k] * b1)? + (g * (1.0 - b1))?)?;
                s[k] = ((&s[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let update = ((&m[k] / c1)? / ((&s[k] / c2)?.sqrt()? + eps)?)?;
                v.set(&(v.as_tensor() - (update * lr)?)?)?;
            }
        }
        last = total / n as f32;
        if epoch % 25 == 0 || epoch + 1 == EPOCHS {
            eprintln!("epoch {epoch:3}: training loss {last:.5}");
        }
    }
    Ok(last)
}

fn quantile(v: &[f32], q: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let out_dir = match args.iter().position(|a| a == "--out-dir") {
        Some(i) => PathBuf::from(args.get(i + 1).ok_or("--out-dir needs a folder")?),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models")),
    };
    let dev = Device::Cpu;
    let normal = |seeds: std::ops::Range<u64>| -> Vec<Vec<[f32; 3]>> {
        seeds.map(|s| data::window(s, WINDOW, None, MIN_FAULTY)).collect()
    };
    let train_w = normal(TRAIN);
    // Scaling from the training readings.
    let readings: Vec<[f32; 3]> = train_w.iter().flatten().copied().collect();
    let mut mean = [0f32; 3];
    let mut std = [0f32; 3];
    for f in 0..3 {
        let n = readings.len() as f64;
        let m = readings.iter().map(|r| r[f] as f64).sum::<f64>() / n;
        let v = readings.iter().map(|r| (r[f] as f64 - m).powi(2)).sum::<f64>() / n;
        mean[f] = m as f32;
        std[f] = v.sqrt() as f32;
    }
    let tensor = |w: &[Vec<[f32; 3]>]| -> R<Tensor> {
        let mut x = flat(w);
        scale(&mut x, &mean, &std);
        Ok(Tensor::from_vec(x, (w.len(), WINDOW * 3), &dev)?)
    };
    let mut rng = Rng::new(42);
    let net = Net::new(&mut rng, &dev)?;
    let t0 = std::time::Instant::now();
    let loss = train(&net, &tensor(&train_w)?, &mut rng)?;
    let train_s = t0.elapsed().as_secs_f64();

    let valid = net.errors(&tensor(&normal(VALID))?)?;
    let threshold = quantile(&valid, 0.995);
    let test_normal = net.errors(&tensor(&normal(TEST_NORMAL))?)?;
    let false_pos = test_normal.iter().filter(|e| **e > threshold).count();
    let mut true_pos = 0;
    let mut faulty_total = 0;
    let mut per_kind = Vec::new();
    for (k, fault) in Fault::ALL.iter().enumerate() {
        let seeds = TEST_FAULTY + k as u64 * 10_000..TEST_FAULTY + k as u64 * 10_000 + FAULTY_PER_KIND;
        let w: Vec<_> = seeds
            .map(|s| data::window(s, WINDOW, Some(*fault), MIN_FAULTY))
            .collect();
        let e = net.errors(&tensor(&w)?)?;
        let hit = e.iter().filter(|e| **e > threshold).count();
        per_kind.push((fault.name(), hit, w.len()));
        true_pos += hit;
        faulty_total += w.len();
    }
    let precision = true_pos as f64 / (true_pos + false_pos).max(1) as f64;
    let recall = true_pos as f64 / faulty_total as f64;
    let f1 = 2.0 * precision * recall / (precision + recall).max(1e-12);

    // The files.
    std::fs::create_dir_all(&out_dir)?;
    let mut layers = Vec::new();
    let mut tensors = HashMap::new();
    for i in 0..LAYERS.len() {
        let w = net.w[i].as_tensor().clone();
        let b = net.b[i].as_tensor().clone();
        let (o, n) = w.dims2()?;
        layers.push((w.flatten_all()?.to_vec1::<f32>()?, b.to_vec1::<f32>()?, o, n));
        tensors.insert(format!("layers.{i}.weight"), w);
        tensors.insert(format!("layers.{i}.bias"), b);
    }
    let st = out_dir.join("machine-anomaly.safetensors");
    candle_core::safetensors::save(&tensors, &st)?;
    let meta = [
        ("fields", FIELDS.join(",")),
        ("window", WINDOW.to_string()),
        ("trained_with", "candle (examples/train_sensor)".to_owned()),
    ];
    let onnx_path = out_dir.join("machine-anomaly.onnx");
    std::fs::write(&onnx_path, onnx::write(&layers, "readings", "reconstruction", &meta))?;
    let list = |v: &[f32; 3]| v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", ");
    let yaml = format!(
        "# Machine anomaly detector: a dense autoencoder over the last {WINDOW} readings of a machine's
# temperature, vibration and current. Trained with candle by `cargo run --release --example
# train_sensor` on its synthetic data set (examples/train_sensor/data.rs); held-out precision
# {precision:.3}, recall {recall:.3} (README, BENCHMARKS.md). The same weights as ONNX for ONNX
# Runtime and dual mode.
name: machine-anomaly
model_type: sensor-anomaly
backend: candle
model_path: machine-anomaly.safetensors
onnx_model_path: machine-anomaly.onnx
sensor:
  fields: [temperature, vibration, current]
  mean: [{}]
  std: [{}]
  window: {WINDOW}
  score: reconstruction_error
  threshold: {threshold}
  max_devices: 1024
  device_timeout_s: 600
mqtt:
  input_topics: [\"edge-ai/+/+/+/sensors/machine\"]
  output_topic_template: \"edge-ai/{{business_unit}}/{{facility}}/{{gateway_id}}/ai/inference/sensor\"
",
        list(&mean),
        list(&std)
    );
    std::fs::write(out_dir.join("machine-anomaly.yaml"), yaml)?;

    println!(
        "training: {} normal windows of {WINDOW} readings, {EPOCHS} epochs, {train_s:.1} s, final loss {loss:.5}",
        train_w.len()
    );
    println!(
        "threshold (99.5th percentile of {} held-out normal windows' error): {threshold:.5}",
        valid.len()
    );
    println!(
        "test: {} normal windows, {false_pos} flagged (false positive rate {:.4})",
        test_normal.len(),
        false_pos as f64 / test_normal.len() as f64
    );
    for (name, hit, n) in &per_kind {
        println!(
            "test: {n} {name} windows, {hit} flagged (recall {:.4})",
            *hit as f64 / *n as f64
        );
    }
    println!("precision {precision:.4}, recall {recall:.4}, F1 {f1:.4}");
    println!(
        "wrote {}, {}, {}",
        st.display(),
        onnx_path.display(),
        out_dir.join("machine-anomaly.yaml").display()
    );
    Ok(())
}
