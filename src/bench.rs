//! Benchmarks as subcommands (`bench decode`, `bench model`, `bench mqtt`),
//! so figures in BENCHMARKS.md come from the shipped binary.
//!
//! Owns: timing loops and their reports (medians, p99, allocations). Uses the
//! same decode, preprocessing, backends and MQTT client as the service.

use std::time::{Duration, Instant};

use crate::alloc_count;
use crate::backend::Backend as _;
use crate::config::Settings;
use crate::frame::{Limits, Slot};
use crate::models::Runner;

/// Median and 99th percentile of `v`, in milliseconds.
pub fn median_p99(v: &mut [Duration]) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// `bench gemm`: the Candle kernels' GEMM against the `gemm` crate, on one thread.
pub fn bench_gemm(settings: &Settings, iters: usize) -> Result<String, String> {
    crate::backend::set_cpu(settings.candle_threads, &settings.candle_isa);
    crate::backend::bench_gemm(iters)
}

/// `bench layouts`: the Candle kernels' NCHW against NHWC on EfficientNet-Lite0's
/// layer shapes (`candle-graph` builds), on the CPU pool the settings give.
pub fn bench_layouts(settings: &Settings, iters: usize) -> Result<String, String> {
    crate::backend::set_cpu(settings.candle_threads, &settings.candle_isa);
    crate::backend::bench_layouts(iters)
}

/// `bench decode FILE [--size S] [--mode letterbox|center-crop] [--filter F]`:
/// decode (any format; turned upright) + preprocess to SxS NCHW f32, on this
/// thread, reporting the medians and allocations per frame.
pub fn bench_decode(file: &str, iters: usize, size: u32, mode: &str, filter: Option<&str>) -> Result<String, String> {
    use crate::config::model::{ChannelOrder, Layout, Preprocessing, ResizeFilter, ResizeMode};
    let jpeg = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mode = match mode {
        "letterbox" => ResizeMode::Letterbox { pad_value: 114 },
        // torchvision's 256 -> 224 ratio.
        "center-crop" => ResizeMode::CenterCrop {
            resize_short: (size as f32 / 0.875).round() as u32,
        },
        "stretch" => ResizeMode::Stretch,
        other => {
            return Err(format!(
                "bench decode: --mode letterbox, center-crop or stretch, not `{other}`"
            ))
        }
    };
    let filter = match filter {
        None => ResizeFilter::Bilinear,
        Some(f) => ResizeFilter::parse(f).ok_or_else(|| format!("bench decode: --filter {}", ResizeFilter::NAMES))?,
    };
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
    let limits = Limits {
        max_payload: jpeg.len(),
        max_width: 7680,
        max_height: 4320,
        max_tensor: crate::preprocess::tensor_len(&pre),
        max_input_width: size as usize,
        max_picture: 0,
    };
    let mut slot = Slot::new(&limits);
    let (mut dec, mut prep, mut allocs, mut bytes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters + 3 {
        let (a0, b0) = alloc_count::snapshot();
        let t0 = Instant::now();
        let mut d = crate::decode::decode_into(&jpeg, &mut slot.rgb, limits.max_width, limits.max_height)
            .map_err(|e| e.to_string())?;
        crate::decode::orient(&mut slot.rgb, &mut slot.rgb_spare, &mut d);
        let t1 = Instant::now();
        let (a1, b1) = alloc_count::snapshot();
        let g = crate::preprocess::Geometry::new(d.width, d.height, &pre);
        crate::preprocess::preprocess_into(&slot.rgb, &g, &pre, &mut slot.pre_scratch, &mut slot.tensor);
        let t2 = Instant::now();
        let (a2, b2) = alloc_count::snapshot();
        if i >= 3 {
            dec.push(t1 - t0);
            prep.push(t2 - t1);
            allocs.push((a1 - a0, a2 - a1));
            bytes.push((b1 - b0, b2 - b1));
        }
        if i == 0 {
            log::info!(
                "{file}: {} {}x{} -> {size}x{size} {mode:?} {} NCHW f32",
                d.format.as_str(),
                d.width,
                d.height,
                filter.as_str()
            );
        }
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let total: Vec<Duration> = dec.iter().zip(&prep).map(|(a, b)| *a + *b).collect();
    let (mut total, md, mp) = (total, median(&mut dec), median(&mut prep));
    let mt = median(&mut total);
    let p = |v: &[(u64, u64)], f: fn(&(u64, u64)) -> u64| v.iter().map(f).max().unwrap_or(0);
    Ok(format!(
        "frames: {iters}\nmedian decode_ms: {md:.3}\nmedian preprocess_ms: {mp:.3}\nmedian total_ms: {mt:.3}\n\
         allocations per frame (max): decode {} ({} bytes), preprocess {} ({} bytes)\n",
        p(&allocs, |a| a.0),
        p(&bytes, |a| a.0),
        p(&allocs, |a| a.1),
        p(&bytes, |a| a.1),
    ))
}

/// `bench model FILE [--model NAME] [--layers N]`: backend-only latency of one
/// model on the tensor preprocessed from FILE (median and p99 over `iters`
/// runs after warm-up) and, where the backend can, its per-layer profile
/// (each layer's median over five profiled runs; the slowest `layers` listed,
/// then totals by kind; `--layers 0` skips the profile).
pub fn bench_model(
    settings: &Settings,
    model: Option<&str>,
    file: &str,
    iters: usize,
    layers: usize,
) -> Result<String, String> {
    let models = crate::service::load_models(settings)?;
    let idx = match model {
        Some(name) => models.find(name).ok_or_else(|| format!("no model named `{name}`"))?,
        None => 0,
    };
    let m = &models.list[idx];
    let Runner::Ml(ml) = &m.runner else {
        return Err(format!(
            "model `{}` is built in; `bench model` times ML backends",
            m.config.name
        ));
    };
    let mut ml = ml.lock();
    let p = &m.config.preprocessing;
    let jpeg = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let ((width, height), tensor) =
        crate::preprocess::tensor_for_image(&jpeg, p, settings.max_image_width, settings.max_image_height)?;
    let mut times = Vec::with_capacity(iters);
    // Dual models: the other backend runs on the same tensor in the same loop, the two
    // taking turns to go first, so a noisy machine slows both alike; their ratio is
    // taken run by run.
    let mut second_times = Vec::with_capacity(iters);
    let mut ratios = Vec::with_capacity(iters);
    let (mut allocs, mut bytes) = (0, 0);
    for i in 0..iters + 3 {
        let ml = &mut *ml;
        let mut second_dt = None;
        if let (Some(s), true) = (ml.comparison.as_mut(), i % 2 == 1) {
            let t0 = Instant::now();
            s.engine.infer(&tensor, &mut s.outputs).map_err(|e| e.to_string())?;
            second_dt = Some(t0.elapsed());
        }
        let (a0, b0) = alloc_count::snapshot_all();
        let t0 = Instant::now();
        ml.primary
            .engine
            .infer(&tensor, &mut ml.primary.outputs)
            .map_err(|e| e.to_string())?;
        let dt = t0.elapsed();
        let (a1, b1) = alloc_count::snapshot_all();
        if let (Some(s), true) = (ml.comparison.as_mut(), i % 2 == 0) {
            let t0 = Instant::now();
            s.engine.infer(&tensor, &mut s.outputs).map_err(|e| e.to_string())?;
            second_dt = Some(t0.elapsed());
        }
        if i >= 3 {
            times.push(dt);
            allocs = allocs.max(a1 - a0);
            bytes = bytes.max(b1 - b0);
            if let Some(d) = second_dt {
                second_times.push(d);
                ratios.push(dt.as_secs_f64() / d.as_secs_f64().max(1e-9));
            }
        }
    }
    let (med, p99) = median_p99(&mut times);
    // The fastest run, for comparisons on a shared machine: noise only ever adds time.
    let min = times.first().map_or(0.0, |d| d.as_secs_f64() * 1e3);
    let second = ml.comparison.as_ref().map(|s| {
        let (m2, p2) = median_p99(&mut second_times);
        ratios.sort_by(f64::total_cmp);
        format!(
            "second backend ({}) median_ms: {m2:.3}\nsecond backend p99_ms: {p2:.3}\n\
             ratio primary/second, run by run (median): {:.2}\n",
            s.engine.name(),
            ratios[ratios.len() / 2]
        )
    });
    let i = &m.config.inference;
    // `--layers 0`: no table, so no profiled runs either.
    let profiled = if layers == 0 { 0 } else { 5 };
    let runs: Vec<Vec<(String, Duration)>> = (0..profiled)
        .filter_map(|_| ml.primary.engine.profile(&tensor))
        .collect();
    let profile = runs.first().map(|first| {
        let mut v: Vec<(String, Duration)> = first
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                let mut d: Vec<Duration> = runs.iter().filter_map(|r| r.get(i).map(|l| l.1)).collect();
                d.sort();
                (name.clone(), d[d.len() / 2])
            })
            .collect();
        let total: Duration = v.iter().map(|l| l.1).sum();
        v.sort_by_key(|l| std::cmp::Reverse(l.1));
        let mut text = format!(
            "per-layer profile (median of 5 runs per layer, {:.1} ms in layers), slowest first:\n",
            total.as_secs_f64() * 1e3
        );
        for (name, d) in v.iter().take(layers) {
            text.push_str(&format!(
                "  {:8.3} ms  {:5.1}%  {name}\n",
                d.as_secs_f64() * 1e3,
                d.as_secs_f64() / total.as_secs_f64() * 100.0
            ));
        }
        // Totals by kind: the first word of each layer's name.
        let mut kinds: Vec<(&str, Duration, usize)> = Vec::new();
        for (name, d) in &v {
            let kind = name.split(' ').next().unwrap_or("");
            match kinds.iter_mut().find(|k| k.0 == kind) {
                Some(k) => (k.1, k.2) = (k.1 + *d, k.2 + 1),
                None => kinds.push((kind, *d, 1)),
            }
        }
        kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
        text.push_str("by kind:\n");
        for (kind, d, n) in kinds {
            text.push_str(&format!(
                "  {:8.3} ms  {:5.1}%  {kind} ({n})\n",
                d.as_secs_f64() * 1e3,
                d.as_secs_f64() / total.as_secs_f64() * 100.0
            ));
        }
        text
    });
    Ok(format!(
        "model: {} ({}, provider {}, intra_threads {}, inter_threads {})\ninput: {file} {}x{} -> {}x{}\n\
         runs: {iters}\nbackend median_ms: {med:.3}\nbackend p99_ms: {p99:.3}\nbackend min_ms: {min:.3}\n\
         allocations per run, all threads (max): {allocs} ({bytes} bytes)\n{}peak RSS of this process (VmHWM): {}\n{}",
        m.config.name,
        m.backend_name(),
        m.provider,
        if i.intra_threads == 0 {
            "default".to_owned()
        } else {
            i.intra_threads.to_string()
        },
        i.inter_threads,
        width,
        height,
        p.width,
        p.height,
        second.unwrap_or_default(),
        peak_rss(),
        profile.unwrap_or_default(),
    ))
}

/// The process's peak resident set size, from /proc/self/status.
pub fn peak_rss() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l[6..].trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// `bench mqtt FILE --result-topic T`: end-to-end latency through a running
/// service: publish FILE (raw JPEG, QoS 1) to `topic`, wait for the next
/// message on `result_topic`, `iters` times, one frame in flight at a time.
pub fn bench_mqtt(
    settings: &Settings,
    file: &str,
    topic: &str,
    result_topic: &str,
    iters: usize,
) -> Result<String, String> {
    use rumqttc::v5::mqttbytes::v5::Packet;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::{Client, Event, MqttOptions};

    let (host, port) = settings.broker.clone().ok_or("bench mqtt needs AIO_BROKER_HOSTNAME")?;
    let jpeg = std::fs::read(file).map_err(|e| format!("cannot read {file}: {e}"))?;
    let mut opts = MqttOptions::new(format!("aei-bench-{}", std::process::id()), host, port);
    opts.set_max_packet_size(Some(crate::mqtt::max_packet_size(settings.max_payload_bytes)));
    opts.set_network_options(crate::mqtt::low_latency());
    let (client, mut conn) = Client::new(opts, 64);
    let (tx, rx) = std::sync::mpsc::channel::<Option<Instant>>();
    let sub = result_topic.to_owned();
    let c2 = client.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.try_subscribe(sub.as_str(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    let _ = tx.send(Some(Instant::now()));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    let wait = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| format!("no {what} within 30 s"))
    };
    wait("SUBACK")?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters + 3 {
        let t0 = Instant::now();
        client
            .publish(topic, QoS::AtLeastOnce, false, jpeg.clone())
            .map_err(|e| e.to_string())?;
        let got = loop {
            if let Some(t) = wait("result")? {
                break t;
            }
        };
        if i >= 3 {
            times.push(got - t0);
        }
    }
    let _ = client.disconnect();
    let (med, p99) = median_p99(&mut times);
    Ok(format!(
        "end to end (publish -> result received), {file}, {iters} frames one at a time\nmedian_ms: {med:.3}\np99_ms: {p99:.3}\n"
    ))
}
