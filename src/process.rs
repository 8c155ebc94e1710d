//! The work on one frame in a slot: decode, then for each routed model
//! preprocess, infer and write the result message.
//!
//! Owns: the order of the stages, their timing, and turning failures into
//! error results. Synchronous and allocation-free for good frames: the async
//! pipeline (`pipeline.rs`) and the one-shot CLI both call it.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Instant, SystemTime};

use crate::backend::Backend as _;
use crate::config::model::{ModelConfig, ModelType, Softmax};
use crate::decode::{self, DecodeError};
use crate::frame::Slot;
use crate::health;
use crate::ingest::{slot_source, FrameError};
use crate::metrics::{FailReason, Metrics, Stage};
use crate::models::{MlModel, Models, Runner};
use crate::postprocess;
use crate::preprocess::{self, Geometry};
use crate::result::{self, Prediction, Timings};
use crate::topic::Bindings;

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
    Error(u16),
}

/// Runs the frame in `slot` through every routed model, calling `emit` after
/// each message is written into `slot.out` / `slot.out_topic`.
pub fn process(slot: &mut Slot, ctx: &Ctx<'_>, mut emit: impl FnMut(&Slot, Emitted)) {
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
    let decode_time = t0.elapsed();
    ctx.metrics.stage(Stage::Decode, decode_time);
    match decoded {
        Ok(d) => {
            slot.decoded = d;
            ctx.metrics.decoded.fetch_add(1, Relaxed);
        }
        Err(e) => {
            let reason = match e {
                DecodeError::NotJpeg(_) => FailReason::NotJpeg,
                DecodeError::TooLarge { .. } => FailReason::ImageTooLarge,
                DecodeError::Corrupt(_) => FailReason::CorruptJpeg,
            };
            return fail(slot, ctx, &FrameError::new(reason, e), &mut emit);
        }
    }

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
                t.infer = ti.elapsed();
                ctx.metrics.stage(Stage::Infer, t.infer);
                let mut out = std::mem::take(&mut slot.out);
                result::write_health(
                    &mut out,
                    SystemTime::now(),
                    &slot_source(slot),
                    &model.config.name,
                    &t,
                    &report,
                );
                slot.out = out;
                Ok(())
            }
            Runner::Ml(ml) => {
                let tp = Instant::now();
                let p = &model.config.preprocessing;
                let g = Geometry::new(w, h, p);
                let n = preprocess::tensor_len(p);
                preprocess::preprocess_into(&slot.rgb, &g, p, &mut slot.pre_scratch, &mut slot.tensor[..n]);
                t.preprocess = tp.elapsed();
                ctx.metrics.stage(Stage::Preprocess, t.preprocess);
                let mut guard = ml.lock().unwrap_or_else(|e| e.into_inner());
                let ml = &mut *guard;
                let ti = Instant::now();
                match ml.engine.infer(&slot.tensor[..n], &mut ml.outputs) {
                    Ok(()) => {
                        t.infer = ti.elapsed();
                        ctx.metrics.stage(Stage::Infer, t.infer);
                        postprocess_into(ml, &model.config, &g);
                        let preds = predictions(ml, model.config.model_type);
                        let alert =
                            postprocess::alert(&model.config.alerts, preds.clone().map(|p| (p.label, p.confidence)));
                        let mut out = std::mem::take(&mut slot.out);
                        result::write_inference(
                            &mut out,
                            SystemTime::now(),
                            &slot_source(slot),
                            &model.config.name,
                            model.backend_name(),
                            &t,
                            (w, h),
                            preds,
                            alert,
                        );
                        slot.out = out;
                        Ok(())
                    }
                    Err(e) => Err(FrameError::new(FailReason::InferenceFailed, e)),
                }
            }
        };
        match outcome {
            Ok(()) => {
                let Slot {
                    out_topic,
                    topic,
                    device,
                    ..
                } = slot;
                model.config.output_topic.render_into(
                    &Bindings {
                        filter: &model.config.input_topics[route.filter as usize],
                        topic,
                        device_id: device,
                        model_name: &model.config.name,
                    },
                    out_topic,
                );
                ctx.metrics.stage(Stage::Total, slot.received_at.elapsed());
                emit(slot, Emitted::Result);
            }
            Err(e) => fail(slot, ctx, &e, &mut emit),
        }
    }
}

/// Turns the raw outputs into top-k classes or kept detections (boxes in
/// original image pixels), in the model's preallocated buffers.
fn postprocess_into(ml: &mut MlModel, config: &ModelConfig, g: &Geometry) {
    let i = &config.inference;
    match ml.yolo {
        Some(layout) => {
            postprocess::decode_yolo(&ml.outputs.values, &layout, i.confidence_threshold, &mut ml.candidates);
            postprocess::nms(
                &mut ml.candidates,
                i.iou_threshold,
                i.class_agnostic_nms,
                i.max_detections,
                &mut ml.kept,
            );
            for d in &mut ml.kept {
                let (x1, y1) = g.to_source(d.bbox[0], d.bbox[1]);
                let (x2, y2) = g.to_source(d.bbox[2], d.bbox[3]);
                d.bbox = [x1, y1, x2, y2];
            }
        }
        None => {
            let scores = &mut ml.outputs.values;
            let apply = match i.softmax {
                Softmax::Always => true,
                Softmax::Never => false,
                Softmax::Auto => !postprocess::looks_like_probabilities(scores),
            };
            if apply {
                postprocess::softmax_inplace(scores);
            }
            postprocess::top_k(scores, i.top_k, i.confidence_threshold, &mut ml.classes);
        }
    }
}

/// The predictions of the last inference, labelled.
fn predictions(ml: &MlModel, kind: ModelType) -> impl Iterator<Item = Prediction<'_>> + Clone {
    let label = |c: usize| ml.labels.get(c).map(String::as_str).unwrap_or("unknown");
    let dets = ml
        .kept
        .iter()
        .filter(move |_| kind == ModelType::Detection)
        .map(move |d| Prediction {
            class_id: d.class_id,
            label: label(d.class_id),
            confidence: d.score,
            bbox: Some(d.bbox),
        });
    let classes = ml
        .classes
        .iter()
        .filter(move |_| kind != ModelType::Detection)
        .map(move |&(c, p)| Prediction {
            class_id: c,
            label: label(c),
            confidence: p,
            bbox: None,
        });
    dets.chain(classes)
}

/// Writes and emits an error result for the frame in `slot`.
pub fn fail(slot: &mut Slot, ctx: &Ctx<'_>, e: &FrameError, emit: &mut impl FnMut(&Slot, Emitted)) {
    ctx.metrics.failed(e.reason);
    log::debug!("frame from `{}` on `{}`: {e}", slot.device, slot.topic);
    let mut out = std::mem::take(&mut slot.out);
    result::write_error(
        &mut out,
        SystemTime::now(),
        &slot_source(slot),
        e.reason.as_str(),
        format_args!("{}", e.detail),
    );
    slot.out = out;
    slot.out_topic.clear();
    slot.out_topic.push_str(ctx.error_topic);
    emit(slot, Emitted::Error(e.http_status()));
}
