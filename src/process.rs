//! The work on one frame in a slot: decode, then for each routed model
//! preprocess, infer and write the result message.
//!
//! Owns: the order of the stages, their timing, and turning failures into
//! error results. Synchronous and allocation-free for good frames: the async
//! pipeline (`pipeline.rs`) and the one-shot CLI both call it.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime};

use crate::alloc_count;
use crate::annotate;
use crate::backend::Backend as _;
use crate::config::model::{ModelConfig, ModelType, SensorScore, Softmax};
use crate::decode::{self, DecodeError};
use crate::envelope::Form;
use crate::frame::{FrameError, Route, Slot};
use crate::health;
use crate::metrics::{FailReason, Metrics, Refusal, Stage};
use crate::models::{EngineState, MlModel, Model, Models, Pool, Runner};
use crate::postprocess;
use crate::postprocess::YoloLayout;
use crate::preprocess::{self, Geometry};
use crate::result::{self, BackendRun, Prediction, SensorVerdict, Timings};
use crate::topic::{Bindings, TopicTemplate};

/// What a worker needs besides the slot.
pub struct Ctx<'a> {
    pub models: &'a Models,
    pub metrics: &'a Metrics,
    pub max_width: u32,
    pub max_height: u32,
    /// Where error results go (MQTT origin).
    pub error_topic: &'a str,
}

/// A message ready in `slot.out`, to go to `slot.out_topic`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitted {
    Result,
    /// A `dual_backend_comparison` (MQTT only; one-shot replies carry the result).
    Comparison,
    /// An `ai_alert_event` (MQTT only).
    Alert,
    /// The annotated JPEG a one-shot caller asked for, in `slot.picture` (in place of the result).
    Picture,
    /// An annotated JPEG of a frame that started or ended an alert, in `slot.picture` (MQTT only).
    AlertPicture,
    /// An `inference_error`, and why.
    Error(Refusal),
}

/// The bytes of a message `process` emitted: the picture buffer for pictures, else `slot.out`.
pub fn body(slot: &Slot, kind: Emitted) -> &[u8] {
    match kind {
        Emitted::Picture | Emitted::AlertPicture => &slot.picture,
        _ => &slot.out,
    }
}

/// Runs the frame in `slot` through every routed model, calling `emit` after
/// each message is written into `slot.out` / `slot.out_topic`.
pub fn process(slot: &mut Slot, ctx: &Ctx<'_>, mut emit: impl FnMut(&Slot, Emitted)) {
    if slot.form == Form::Reading {
        return process_reading(slot, ctx, &mut emit);
    }
    let t0 = Instant::now();
    let decoded = {
        let Slot {
            payload,
            jpeg,
            jpeg_in_payload,
            jpeg_range,
            rgb,
            ..
        } = slot;
        let src = if *jpeg_in_payload {
            &payload[jpeg_range.clone()]
        } else {
            &jpeg[jpeg_range.clone()]
        };
        decode::decode_into(src, rgb, ctx.max_width, ctx.max_height)
    };
    match decoded {
        Ok(mut d) => {
            if !d.orientation.is_identity() {
                decode::orient(&mut slot.rgb, &mut slot.rgb_spare, &mut d);
                ctx.metrics.oriented.fetch_add(1, Relaxed);
            }
            slot.decoded = d;
            ctx.metrics.decoded[d.format as usize].fetch_add(1, Relaxed);
        }
        Err(e) => {
            ctx.metrics.stage(Stage::Decode, t0.elapsed());
            let reason = match e {
                DecodeError::UnknownFormat(_) => FailReason::UnknownFormat,
                DecodeError::TooLarge { .. } => FailReason::ImageTooLarge,
                DecodeError::Corrupt(decode::Format::Jpeg, _) => FailReason::CorruptJpeg,
                DecodeError::Corrupt(..) => FailReason::CorruptImage,
            };
            return fail(slot, ctx, &FrameError::new(reason, e), &mut emit);
        }
    }
    let decode_time = t0.elapsed();
    ctx.metrics.stage(Stage::Decode, decode_time);

    for i in 0..slot.routes.len() {
        let route = slot.routes[i];
        let model = &ctx.models.list[route.model as usize];
        let mut t = Timings {
            decode: decode_time,
            ..Timings::default()
        };
        let (w, h) = (slot.decoded.width, slot.decoded.height);
        let outcome = match &model.runner {
            Runner::Health(monitor) => {
                let ti = Instant::now();
                let rgb = &slot.rgb[..w as usize * h as usize * 3];
                let mut report = health::analyse(rgb, w, h, &model.config.health, &mut slot.health_scratch);
                report.frozen = monitor.frozen(&slot.device, health::content_hash(rgb));
                ctx.metrics.cameras.seen(
                    &slot.device,
                    SystemTime::now(),
                    report.frozen,
                    report.black_frame,
                    report.blurry,
                );
                t.infer = ti.elapsed();
                ctx.metrics.stage(Stage::Infer, t.infer);
                let mut out = std::mem::take(&mut slot.out);
                result::write_health(
                    &mut out,
                    SystemTime::now(),
                    &slot.source(),
                    &model.config.name,
                    &t,
                    &slot.decoded,
                    &report,
                );
                slot.out = out;
                Ok(true)
            }
            Runner::Ml(ml) => run_ml(slot, ctx, model, route, &mut t, ml, &mut emit),
        };
        match outcome {
            Ok(true) => {
                emit_to(
                    slot,
                    ctx,
                    model,
                    route,
                    &model.config.output_topic,
                    Emitted::Result,
                    &mut emit,
                );
            }
            Ok(false) => {}
            Err(e) => fail(slot, ctx, &e, &mut emit),
        }
    }
}

/// Renders `template` for the frame into `slot.out_topic` and emits `slot.out`.
fn emit_to(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    model: &Model,
    route: Route,
    template: &TopicTemplate,
    kind: Emitted,
    emit: &mut impl FnMut(&Slot, Emitted),
) {
    let Slot {
        out_topic,
        topic,
        device,
        ..
    } = slot;
    template.render_into(
        &Bindings {
            filter: &model.config.input_topics[route.filter as usize],
            topic,
            device_id: device,
            model_name: &model.config.name,
        },
        out_topic,
    );
    if kind == Emitted::Result {
        ctx.metrics.stage(Stage::Total, slot.received_at.elapsed());
        model.frames.fetch_add(1, Relaxed);
    }
    emit(slot, kind);
}

/// Preprocesses, runs the primary backend, writes its result and emits it;
/// in dual mode also runs the second backend on the same tensor and emits the
/// comparison. Returns `Ok(false)`: everything is emitted here.
fn run_ml(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    model: &Model,
    route: Route,
    t: &mut Timings,
    ml: &Pool,
    emit: &mut impl FnMut(&Slot, Emitted),
) -> Result<bool, FrameError> {
    let (w, h) = (slot.decoded.width, slot.decoded.height);
    let config = &model.config;
    let tp = Instant::now();
    let p = &config.preprocessing;
    let g = Geometry::new(w, h, p);
    let n = preprocess::tensor_len(p);
    preprocess::preprocess_into(&slot.rgb, &g, p, &mut slot.pre_scratch, &mut slot.tensor[..n]);
    t.preprocess = tp.elapsed();
    ctx.metrics.stage(Stage::Preprocess, t.preprocess);

    let mut guard = ml.lock();
    let MlModel {
        primary,
        comparison,
        labels,
        yolo,
    } = &mut *guard;
    let run_a = run_engine(primary, &slot.tensor[..n], ctx, model)?;
    t.infer = run_a.time;
    ctx.metrics.stage(Stage::Infer, t.infer);
    postprocess_engine(primary, *yolo, config, &g);
    let now = SystemTime::now();
    if let (Some(max_gap_s), Some(_)) = (config.tracking, *yolo) {
        model.tracks.lock().unwrap_or_else(|e| e.into_inner()).assign(
            &slot.device,
            unix_seconds(now),
            max_gap_s,
            &primary.kept,
            &mut primary.track_ids,
        );
    }
    let zoning = result::Zoning {
        zones: &config.zones,
        camera: crate::zones::for_camera(&config.zones, &slot.device, &slot.topic),
    };
    let size = (slot.decoded.width, slot.decoded.height);
    let preds = predictions(
        primary,
        labels,
        config.model_type,
        zoning,
        size,
        config.tracking.is_some(),
    );
    let alert = postprocess::alert(&config.alerts, preds.clone().map(|p| (p.label, p.confidence)));
    if slot.annotate {
        if let Err(e) = picture(slot, ctx, config, preds.clone(), zoning.camera, usize::MAX) {
            return Err(FrameError::new(FailReason::ImageTooLarge, e));
        }
        emit(slot, Emitted::Picture);
    }
    let mut out = std::mem::take(&mut slot.out);
    let result_id = result::write_inference(
        &mut out,
        now,
        &slot.source(),
        &config.name,
        result::Ran {
            backend_used: &primary.backend_used,
            placement: primary.engine.placement(),
        },
        t,
        &slot.decoded,
        preds.clone(),
        alert,
        zoning,
    );
    slot.out = out;
    emit_to(slot, ctx, model, route, &config.output_topic, Emitted::Result, emit);
    if !config.alert_rules.is_empty() {
        let changed = alert_events(slot, ctx, model, route, now, result_id, preds.clone(), emit);
        if changed && !slot.annotate {
            if let Some(topic) = &config.annotations.topic {
                alert_picture(slot, ctx, model, route, now, topic, preds.clone(), zoning.camera, emit);
            }
        }
    }

    if let Some(second) = comparison {
        // One frame, one result: a failing second backend marks the comparison failed.
        let run_b = run_engine(second, &slot.tensor[..n], ctx, model);
        let matched = match &run_b {
            Ok(_) => {
                postprocess_engine(second, *yolo, config, &g);
                let matched = match yolo {
                    Some(_) => postprocess::detections_match(&primary.kept, &second.kept, DUAL_IOU),
                    None => postprocess::probabilities_match(
                        &primary.outputs.values,
                        &second.outputs.values,
                        config.inference.dual_tolerance,
                    ),
                };
                ctx.metrics.dual(matched);
                matched
            }
            Err(e) => {
                ctx.metrics.dual_failed.fetch_add(1, Relaxed);
                log::warn!(
                    "model `{}`: the second backend ({}) failed on a frame from `{}`: {e}",
                    config.name,
                    second.engine.name(),
                    slot.device
                );
                false
            }
        };
        let mut out = std::mem::take(&mut slot.out);
        result::write_comparison(
            &mut out,
            SystemTime::now(),
            &slot.source(),
            &config.name,
            [
                (primary.engine.name(), Ok(run_a), preds),
                (
                    second.engine.name(),
                    run_b.as_ref().map(|r| *r).map_err(|e| e.detail.as_str()),
                    predictions(second, labels, config.model_type, zoning, size, false),
                ),
            ],
            matched,
        );
        slot.out = out;
        emit_to(
            slot,
            ctx,
            model,
            route,
            &config.comparison_topic,
            Emitted::Comparison,
            emit,
        );
    }
    Ok(false)
}

/// A sensor reading: each routed sensor model's window (prepared by the ingest task) is
/// inferred once it is full; until then the answer says the window is filling.
fn process_reading(slot: &mut Slot, ctx: &Ctx<'_>, emit: &mut impl FnMut(&Slot, Emitted)) {
    for i in 0..slot.routes.len() {
        let route = slot.routes[i];
        let model = &ctx.models.list[route.model as usize];
        let (Some(sensor), Runner::Ml(ml), Some(&win)) =
            (&model.config.sensor, &model.runner, slot.reading_windows.get(i))
        else {
            continue;
        };
        let mut t = Timings::default();
        let mut v = SensorVerdict {
            score: None,
            threshold: sensor.threshold,
            readings: win.filled,
            window: win.size,
        };
        if win.len == 0 {
            // Still filling: answered, not inferred.
            let mut out = std::mem::take(&mut slot.out);
            // The backend that would have run it: in dual mode Candle's result is the result.
            result::write_sensor(
                &mut out,
                SystemTime::now(),
                &slot.source(),
                &model.config.name,
                result::Ran {
                    backend_used: &model.backend_used,
                    placement: &model.placement,
                },
                sensor.score.as_str(),
                &t,
                &v,
            );
            slot.out = out;
            emit_to(
                slot,
                ctx,
                model,
                route,
                &model.config.output_topic,
                Emitted::Result,
                emit,
            );
            continue;
        }
        let tp = Instant::now();
        let n = win.len;
        slot.tensor[..n].copy_from_slice(&slot.reading[win.start..win.start + n]);
        t.preprocess = tp.elapsed();
        ctx.metrics.stage(Stage::Preprocess, t.preprocess);
        let mut guard = ml.lock();
        let MlModel {
            primary, comparison, ..
        } = &mut *guard;
        let run_a = match run_engine(primary, &slot.tensor[..n], ctx, model) {
            Ok(r) => r,
            Err(e) => {
                drop(guard);
                fail(slot, ctx, &e, emit);
                continue;
            }
        };
        t.infer = run_a.time;
        ctx.metrics.stage(Stage::Infer, t.infer);
        let score_a = sensor_score(sensor.score, &slot.tensor[..n], &primary.outputs.values);
        v.score = Some(score_a);
        let mut out = std::mem::take(&mut slot.out);
        result::write_sensor(
            &mut out,
            SystemTime::now(),
            &slot.source(),
            &model.config.name,
            result::Ran {
                backend_used: &primary.backend_used,
                placement: primary.engine.placement(),
            },
            sensor.score.as_str(),
            &t,
            &v,
        );
        slot.out = out;
        emit_to(
            slot,
            ctx,
            model,
            route,
            &model.config.output_topic,
            Emitted::Result,
            emit,
        );
        if let Some(second) = comparison {
            let run_b = run_engine(second, &slot.tensor[..n], ctx, model);
            let vb = run_b.as_ref().ok().map(|_| SensorVerdict {
                score: Some(sensor_score(sensor.score, &slot.tensor[..n], &second.outputs.values)),
                ..v
            });
            let matched = match vb {
                Some(vb) => {
                    let (a, b) = (score_a, vb.score.unwrap_or(f32::NAN));
                    let m = vb.anomaly() == v.anomaly()
                        && (a - b).abs() <= model.config.inference.dual_tolerance * a.abs().max(1.0);
                    ctx.metrics.dual(m);
                    m
                }
                None => {
                    ctx.metrics.dual_failed.fetch_add(1, Relaxed);
                    false
                }
            };
            let mut out = std::mem::take(&mut slot.out);
            result::write_sensor_comparison(
                &mut out,
                SystemTime::now(),
                &slot.source(),
                &model.config.name,
                [
                    (primary.engine.name(), Ok((run_a, v))),
                    (
                        second.engine.name(),
                        match (&run_b, vb) {
                            (Ok(r), Some(vb)) => Ok((*r, vb)),
                            (Err(e), _) => Err(e.detail.as_str()),
                            (Ok(_), None) => Err("no score"),
                        },
                    ),
                ],
                matched,
            );
            slot.out = out;
            drop(guard);
            emit_to(
                slot,
                ctx,
                model,
                route,
                &model.config.comparison_topic,
                Emitted::Comparison,
                emit,
            );
        }
    }
}

/// The score of a sensor model's output: an autoencoder's mean squared reconstruction error
/// over its input, or the first output value.
pub fn sensor_score(kind: SensorScore, input: &[f32], output: &[f32]) -> f32 {
    match kind {
        SensorScore::ReconstructionError => {
            let n = input.len().min(output.len()).max(1);
            input.iter().zip(output).map(|(x, y)| (x - y) * (x - y)).sum::<f32>() / n as f32
        }
        SensorScore::Output => output.first().copied().unwrap_or(f32::NAN),
    }
}

/// Boxes of two backends match when their IoU reaches this (dual mode).
pub const DUAL_IOU: f32 = 0.9;

/// Runs one backend on the tensor, timing it and counting what the process
/// allocated meanwhile (every thread: Candle's work runs on its pool; with
/// several workers at once, theirs is counted too).
fn run_engine(state: &mut EngineState, tensor: &[f32], ctx: &Ctx<'_>, model: &Model) -> Result<BackendRun, FrameError> {
    let (_, bytes0) = alloc_count::snapshot_all();
    let t0 = Instant::now();
    state
        .engine
        .infer(tensor, &mut state.outputs)
        .map_err(|e| FrameError::new(FailReason::InferenceFailed, e))?;
    let time = t0.elapsed();
    let (_, bytes1) = alloc_count::snapshot_all();
    ctx.metrics.backend(state.engine.name(), time);
    model.latency[crate::metrics::backend_index(state.engine.name())].observe(time);
    Ok(BackendRun {
        time,
        allocated_bytes: bytes1 - bytes0,
    })
}

/// Turns the raw outputs into top-k classes or kept detections (boxes in
/// original image pixels), in the state's preallocated buffers.
fn postprocess_engine(state: &mut EngineState, yolo: Option<YoloLayout>, config: &ModelConfig, g: &Geometry) {
    let i = &config.inference;
    match yolo {
        Some(layout) => {
            postprocess::decode_yolo(
                &state.outputs.values,
                &layout,
                i.confidence_threshold,
                &mut state.candidates,
            );
            postprocess::nms(
                &mut state.candidates,
                i.iou_threshold,
                i.class_agnostic_nms,
                i.max_detections,
                &mut state.kept,
            );
            for d in &mut state.kept {
                let (x1, y1) = g.to_source(d.bbox[0], d.bbox[1]);
                let (x2, y2) = g.to_source(d.bbox[2], d.bbox[3]);
                d.bbox = [x1, y1, x2, y2];
            }
        }
        None => {
            let scores = &mut state.outputs.values;
            let apply = match i.softmax {
                Softmax::Always => true,
                Softmax::Never => false,
                Softmax::Auto => !postprocess::looks_like_probabilities(scores),
            };
            if apply {
                postprocess::softmax_inplace(scores);
            }
            postprocess::top_k(scores, i.top_k, i.confidence_threshold, &mut state.classes);
        }
    }
}

/// The predictions of an engine's last inference, labelled.
fn predictions<'a>(
    state: &'a EngineState,
    labels: &'a [String],
    kind: ModelType,
    zoning: result::Zoning<'a>,
    (width, height): (u32, u32),
    tracked: bool,
) -> impl Iterator<Item = Prediction<'a>> + Clone {
    let label = move |c: usize| labels.get(c).map(String::as_str).unwrap_or("unknown");
    let dets = state
        .kept
        .iter()
        .enumerate()
        .filter(move |_| kind == ModelType::Detection)
        .map(move |(i, d)| Prediction {
            class_id: d.class_id,
            label: label(d.class_id),
            confidence: d.score,
            bbox: Some(d.bbox),
            zones: match zoning.camera {
                0 => 0,
                cam => crate::zones::containing(zoning.zones, cam, label(d.class_id), d.bbox, width, height),
            },
            track_id: state.track_ids.get(i).copied().filter(|_| tracked),
        });
    let classes = state
        .classes
        .iter()
        .filter(move |_| kind != ModelType::Detection)
        .map(move |&(c, p)| Prediction {
            class_id: c,
            label: label(c),
            confidence: p,
            bbox: None,
            zones: 0,
            track_id: None,
        });
    dets.chain(classes)
}

/// Draws the frame's predictions and zones on a copy of it (the spare RGB buffer) and encodes
/// it into `slot.picture`, within `max_bytes`. Counted in `aei_pictures_total`.
fn picture<'p>(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    config: &ModelConfig,
    preds: impl Iterator<Item = Prediction<'p>>,
    zone_mask: u64,
    max_bytes: usize,
) -> Result<(), annotate::AnnotateError> {
    let (w, h) = (slot.decoded.width, slot.decoded.height);
    let n = w as usize * h as usize * 3;
    let Slot {
        rgb,
        rgb_spare,
        picture,
        ..
    } = slot;
    rgb_spare[..n].copy_from_slice(&rgb[..n]);
    let marks = preds.map(|p| annotate::Mark {
        class_id: p.class_id,
        label: p.label,
        confidence: p.confidence,
        bbox: p.bbox,
    });
    let mut canvas = annotate::Canvas {
        rgb: &mut rgb_spare[..n],
        width: w,
        height: h,
    };
    annotate::draw(&mut canvas, marks, &config.zones, zone_mask);
    let done = annotate::encode(&rgb_spare[..n], w, h, config.annotations.quality, max_bytes, picture);
    ctx.metrics.picture(match &done {
        Ok(_) => annotate::Outcome::Drawn,
        Err(annotate::AnnotateError::TooLarge(..)) => annotate::Outcome::TooLarge,
        Err(annotate::AnnotateError::Encode(_)) => annotate::Outcome::Failed,
    });
    done.map(|_| ())
}

/// An alert started or ended on this frame: its annotated picture goes to the model's
/// `annotated_topic_template`, at most one per camera per `annotations.min_interval_s`, and
/// only within `annotations.max_bytes`.
#[allow(clippy::too_many_arguments)]
fn alert_picture<'p>(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    model: &Model,
    route: Route,
    now: SystemTime,
    topic: &TopicTemplate,
    preds: impl Iterator<Item = Prediction<'p>>,
    zone_mask: u64,
    emit: &mut impl FnMut(&Slot, Emitted),
) {
    let a = &model.config.annotations;
    let secs = unix_seconds(now);
    let due = model
        .alerts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .picture_due(&slot.device, secs, a.min_interval_s);
    if !due {
        ctx.metrics.picture(annotate::Outcome::RateLimited);
        return;
    }
    match picture(slot, ctx, &model.config, preds, zone_mask, a.max_bytes) {
        Ok(()) => emit_to(slot, ctx, model, route, topic, Emitted::AlertPicture, emit),
        Err(e) => log::warn!(
            model = model.config.name.as_str(), device = slot.device.as_str();
            "no annotated picture for `{}`'s alert: {e}", slot.device
        ),
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Feeds the frame's detections to the model's alert rules and emits the events they cause
/// (`ai_alert_event` on `alerts_topic`). The camera is the frame's device id. Returns whether
/// an alert started or ended.
#[allow(clippy::too_many_arguments)]
fn alert_events<'p>(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    model: &Model,
    route: Route,
    now: SystemTime,
    result_id: (u64, u64),
    preds: impl Iterator<Item = Prediction<'p>> + Clone,
    emit: &mut impl FnMut(&Slot, Emitted),
) -> bool {
    let config = &model.config;
    let mut obs = [crate::alerts::Observation::default(); crate::config::model::MAX_ALERT_RULES];
    for (o, rule) in obs.iter_mut().zip(&config.alert_rules) {
        let zone = rule
            .zone
            .as_ref()
            .and_then(|z| config.zones.iter().position(|c| &c.name == z));
        for p in preds.clone() {
            let class = rule.classes.is_empty() || rule.classes.iter().any(|c| c == p.label);
            let in_zone = zone.is_none_or(|i| p.zones & (1 << i) != 0);
            if class && in_zone && p.confidence >= rule.min_confidence {
                o.count += 1;
                o.peak = o.peak.max(p.confidence);
            }
        }
    }
    let secs = unix_seconds(now);
    // Empty unless an alert starts, changes or ends: no allocation on most frames.
    let mut events = Vec::new();
    let save_failed = {
        let mut alerts = model.alerts.lock().unwrap_or_else(|e| e.into_inner());
        alerts.observe(
            &slot.device,
            secs,
            result_id,
            &config.alert_rules,
            &obs[..config.alert_rules.len()],
            &mut events,
        );
        // With an `alert_state_file`: on every event, else every few seconds.
        alerts.save_if_due(&config.name, secs, !events.is_empty())
    };
    if let Some(why) = save_failed {
        log::warn!(model = config.name.as_str(); "model `{}`: {why}", config.name);
    }
    for e in &events {
        ctx.metrics.alert_event(e.phase);
        log::info!(
            model = config.name.as_str(), device = slot.device.as_str(), rule = config.alert_rules[e.alert.rule].name.as_str();
            "alert {} {}: {} on `{}`", e.alert.id, e.phase.as_str(), config.alert_rules[e.alert.rule].name, slot.device
        );
        let mut out = std::mem::take(&mut slot.out);
        result::write_alert(
            &mut out,
            now,
            &slot.source(),
            &config.name,
            &config.alert_rules[e.alert.rule],
            e,
        );
        slot.out = out;
        emit_to(slot, ctx, model, route, &config.alerts_topic, Emitted::Alert, emit);
    }
    events.iter().any(|e| e.phase != crate::alerts::Phase::Update)
}

/// Writes and emits an error result for the frame in `slot`.
pub fn fail(slot: &mut Slot, ctx: &Ctx<'_>, e: &FrameError, emit: &mut impl FnMut(&Slot, Emitted)) {
    ctx.metrics.failed(e.reason);
    log::debug!(
        device = slot.device.as_str(), topic = slot.topic.as_str(), reason = e.reason.as_str();
        "frame from `{}` on `{}`: {e}", slot.device, slot.topic
    );
    let mut out = std::mem::take(&mut slot.out);
    result::write_error(
        &mut out,
        SystemTime::now(),
        &slot.source(),
        e.reason.as_str(),
        format_args!("{}", e.detail),
    );
    slot.out = out;
    slot.out_topic.clear();
    slot.out_topic.push_str(ctx.error_topic);
    emit(slot, Emitted::Error(Refusal::Failed(e.reason)));
}
