//! The frame pipeline: an executor we own drives one ingest task and a fixed
//! set of worker tasks over the slot ring; MQTT and HTTP threads talk to it
//! through bounded channels.
//!
//! ```text
//! mqtt thread ─┐                    ┌─ worker ─┐
//! http threads ┴─> incoming ─> ingest ─> ring ─┼─ worker ─┼─> outbound ─> mqtt publisher
//!                                              └─ worker ─┘   (or the request's reply)
//! ```
//!
//! Owns: task wiring, slot acquisition (wait for a free slot; a newer frame
//! of the same camera supersedes; too old is stale), delivery of results
//! and error results to their destination. The work on a frame is
//! `process.rs`; message checks are `ingest.rs`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::dedup::{self, Seen};
use crate::frame::Route;
use crate::frame::{Limits, Origin, Ring, Slot, WorkBuffers, RESULT_CAPACITY};
use crate::ingest;
use crate::messages::{Ack, Incoming, Outbound, Reply, ToMqtt};
use crate::metrics::{DropReason, Metrics, Refusal, Stage};
use crate::models::{Models, MAX_MODELS};
use crate::process::{self, Ctx, Emitted};
use crate::registry::Registry;
use crate::result;

/// Everything the tasks share.
pub struct Shared {
    /// The live model set; each frame takes a snapshot at ingest.
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub ring: Ring,
    pub limits: Limits,
    pub error_topic: String,
    /// Frames per second per source; 0: unlimited.
    pub max_fps_per_source: f64,
    /// `None`: MQTT is off and MQTT-origin results have nowhere to go.
    pub outbound: Option<async_channel::Sender<ToMqtt>>,
    /// Recently admitted QoS 1/2 messages; `None`: repeats are not detected.
    pub dedup: Option<std::sync::Mutex<dedup::Window>>,
    pub policy: Policy,
}

/// Which frames may go unprocessed (answered `dropped`), besides none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// A newer frame of the same camera replaces its frame still waiting for
    /// a worker (`DROP_SUPERSEDED`, live monitoring); off: every frame is inferred.
    pub supersede: bool,
    /// Frames older than this when their turn comes are answered `stale`
    /// (`MAX_FRAME_AGE_S`); `None`: no limit.
    pub max_age: Option<std::time::Duration>,
}

impl Policy {
    /// How far past `max_age` a frame taken at `taken_at` is, if it is.
    fn too_old(&self, taken_at: SystemTime, now: SystemTime) -> Option<std::time::Duration> {
        let max = self.max_age?;
        let age = now.duration_since(taken_at).unwrap_or_default();
        (age > max).then_some(age)
    }
}

impl Shared {
    fn ctx<'a>(&'a self, models: &'a Models) -> Ctx<'a> {
        Ctx {
            models,
            metrics: &self.metrics,
            max_width: self.limits.max_width,
            max_height: self.limits.max_height,
            error_topic: &self.error_topic,
        }
    }
}

/// Runs the pipeline until `incoming` closes: spawns the executor threads
/// (one per worker, plus one so ingest never waits behind busy workers) and
/// returns their handles.
pub fn start(
    shared: Arc<Shared>,
    incoming: async_channel::Receiver<Incoming>,
    workers: usize,
) -> Vec<std::thread::JoinHandle<()>> {
    let ex = Arc::new(smol::Executor::new());
    let mut tasks = Vec::with_capacity(workers + 1);
    {
        let shared = shared.clone();
        tasks.push(ex.spawn(async move {
            ingest_loop(&shared, incoming).await;
            shared.ring.close();
        }));
    }
    for _ in 0..workers {
        let shared = shared.clone();
        let buffers = WorkBuffers::new(&shared.limits);
        tasks.push(ex.spawn(async move { worker_loop(&shared, buffers).await }));
    }
    let (done_tx, done_rx) = async_channel::bounded::<()>(1);
    let join = {
        let ex = ex.clone();
        std::thread::Builder::new()
            .name("pipeline-join".into())
            .spawn(move || {
                smol::block_on(ex.run(async {
                    for t in tasks {
                        t.await;
                    }
                }));
                done_tx.close();
            })
            .expect("spawn pipeline thread")
    };
    let mut threads: Vec<_> = (0..workers)
        .map(|i| {
            let ex = ex.clone();
            let done = done_rx.clone();
            std::thread::Builder::new()
                .name(format!("pipeline-{i}"))
                .spawn(move || {
                    let _ = smol::block_on(ex.run(done.recv()));
                })
                .expect("spawn pipeline thread")
        })
        .collect();
    threads.push(join);
    threads
}

async fn ingest_loop(shared: &Shared, incoming: async_channel::Receiver<Incoming>) {
    let mut routes: Vec<Route> = Vec::with_capacity(MAX_MODELS);
    let mut rate = ingest::RateLimit::new(shared.max_fps_per_source);
    let mut err_buf: Vec<u8> = Vec::with_capacity(RESULT_CAPACITY);
    // A sensor reading's scaled rows, one per routed sensor model.
    let mut rows: Vec<f32> = Vec::with_capacity(MAX_MODELS * crate::config::model::MAX_SENSOR_FIELDS);
    while let Ok(msg) = incoming.recv().await {
        let t0 = Instant::now();
        shared.metrics.messages_received.fetch_add(1, Relaxed);
        let topic = std::str::from_utf8(&msg.topic).unwrap_or("");
        let models = match msg.model {
            Some((models, m)) => {
                routes.clear();
                routes.push(Route {
                    model: m as u16,
                    filter: 0,
                });
                models
            }
            None => {
                let models = shared.registry.snapshot();
                ingest::route(&models, topic, &mut routes);
                models
            }
        };
        if routes.is_empty() {
            log::warn!(topic = topic; "message on `{topic}` matches no model's input topics; ignored");
            ack(shared, msg.ack).await;
            continue;
        }
        let mut msg_ack = msg.ack;
        if let (Some(a), Some(w)) = (msg_ack.as_mut(), &shared.dedup) {
            let repeat = check_repeat(
                &mut w.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                topic,
                &msg.payload,
                a,
                msg.dup,
            );
            if repeat != Repeat::No {
                shared.metrics.repeats.fetch_add(1, Relaxed);
                log::debug!(topic = topic; "message on `{topic}` repeats one already admitted; not answered again");
                if repeat == Repeat::AckNow {
                    ack(shared, msg_ack).await;
                }
                continue;
            }
        }
        let oneshot = msg.reply.as_ref().map(|_| "http");
        let reading = ingest::split_by_kind(&models, &msg.payload, &mut routes);
        let admitted = match reading {
            true => ingest::admit_reading(
                topic,
                &msg.payload,
                oneshot,
                shared.limits.max_payload,
                &models,
                &routes,
                &mut rows,
            ),
            false => ingest::admit(
                topic,
                &msg.payload,
                oneshot,
                shared.limits.max_payload,
                &models,
                &routes,
            ),
        };
        let a = match admitted {
            Ok(a) => a,
            Err(e) => {
                shared.metrics.failed(e.reason);
                log::debug!(topic = topic, reason = e.reason.as_str(); "message on `{topic}` refused: {e}");
                ingest::write_early_error(&mut err_buf, topic, &msg.payload, oneshot.is_some(), &e);
                let origin = msg.reply.map(Origin::Reply).unwrap_or_default();
                deliver(
                    shared,
                    &origin,
                    &shared.error_topic,
                    &err_buf,
                    Emitted::Error(Refusal::Failed(e.reason)),
                )
                .await;
                ack(shared, msg_ack).await;
                continue;
            }
        };
        shared.metrics.received(a.envelope.form);
        // Refused before it takes a slot: over its camera's rate, or too old already (an
        // envelope stamped long ago, or a backlog the broker kept).
        // The rate limit is for cameras: a sensor's readings all join its window.
        let refused = if !reading && rate.as_mut().is_some_and(|r| !r.admit(a.device, t0)) {
            let why = format!("`{}` sends faster than MAX_FPS_PER_SOURCE", a.device);
            Some((DropReason::RateLimited, why))
        } else {
            let age = shared.policy.too_old(ingest::taken_at(&a.envelope), SystemTime::now());
            age.map(|age| (DropReason::Stale, stale_why(&shared.policy, age)))
        };
        if let Some((reason, why)) = refused {
            shared.metrics.dropped(reason);
            ingest::write_unslotted(
                &mut err_buf,
                topic,
                &msg.payload,
                oneshot.is_some(),
                "dropped",
                format_args!("{}: {why}", reason.as_str()),
            );
            let origin = msg.reply.map(Origin::Reply).unwrap_or_default();
            deliver(
                shared,
                &origin,
                &shared.error_topic,
                &err_buf,
                Emitted::Error(Refusal::Dropped(reason)),
            )
            .await;
            ack(shared, msg_ack).await;
            continue;
        }
        let mut slot = match shared.ring.try_free() {
            Some(s) => s,
            // A reading never supersedes: every one joins its device's window.
            None => match (shared.policy.supersede && !reading)
                .then(|| shared.ring.supersede(a.device))
                .flatten()
            {
                // Every slot is busy and this camera's previous frame still waits: the newer
                // frame takes its slot and its place in line.
                Some(mut old) => {
                    report_drop(
                        shared,
                        &mut old,
                        DropReason::Superseded,
                        "a newer frame from the same camera arrived while every frame slot was busy",
                    )
                    .await;
                    old
                }
                // Wait for a slot; nothing is evicted. The broker holds the rest (Receive Maximum).
                None => {
                    shared.metrics.slot_waits.fetch_add(1, Relaxed);
                    match shared.ring.free().await {
                        Some(s) => s,
                        None => return,
                    }
                }
            },
        };
        slot.reset();
        slot.routes.extend_from_slice(&routes);
        slot.models = Some(models.clone());
        slot.annotate = msg.annotate && msg.reply.is_some();
        let origin = msg.reply.map(Origin::Reply).unwrap_or_default();
        let filled = ingest::fill(&mut slot, topic, &msg.payload, &a, origin).and_then(|()| match reading {
            true => ingest::window_reading(&mut slot, &models, &rows, t0),
            false => Ok(()),
        });
        match filled {
            Ok(()) => {
                slot.ack = msg_ack;
                shared.ring.push(slot)
            }
            Err(e) => {
                let (origin, pending) = work(shared, &mut slot, |slot, ctx, c| {
                    process::fail(slot, ctx, &e, &mut |s: &Slot, k| c.push(s, k))
                });
                shared.ring.release(slot);
                deliver_all(shared, &origin, pending).await;
                ack(shared, msg_ack).await;
            }
        }
        shared.metrics.stage(Stage::Ingest, t0.elapsed());
    }
}

fn stale_why(p: &Policy, age: std::time::Duration) -> String {
    format!(
        "the frame was {:.1} s old when its turn came, over MAX_FRAME_AGE_S = {}",
        age.as_secs_f64(),
        p.max_age.unwrap_or_default().as_secs_f64()
    )
}

/// Tells the owner of a dropped frame why it got no result, and acknowledges it.
async fn report_drop(shared: &Shared, slot: &mut Slot, reason: DropReason, why: &str) {
    log::debug!(
        device = slot.device.as_str(), topic = slot.topic.as_str(), reason = reason.as_str();
        "dropped frame from `{}`: {}", slot.device, reason.as_str()
    );
    let mut out = std::mem::take(&mut slot.out);
    result::write_error(
        &mut out,
        std::time::SystemTime::now(),
        &slot.source(),
        "dropped",
        format_args!("{}: {why}", reason.as_str()),
    );
    slot.out = out;
    let origin = std::mem::take(&mut slot.origin);
    deliver(
        shared,
        &origin,
        &shared.error_topic,
        &slot.out,
        Emitted::Error(Refusal::Dropped(reason)),
    )
    .await;
    ack(shared, slot.ack.take()).await;
}

async fn worker_loop(shared: &Shared, mut buffers: WorkBuffers) {
    while let Some(mut slot) = shared.ring.next().await {
        let age = shared.policy.too_old(slot.taken_at, SystemTime::now());
        let abandoned = matches!(&slot.origin, Origin::Reply(tx) if tx.is_closed());
        if age.is_some() || abandoned {
            shared.metrics.dropped(DropReason::Stale);
            let why = match age {
                Some(age) => stale_why(&shared.policy, age),
                None => "the one-shot caller stopped waiting for the answer".to_owned(),
            };
            report_drop(shared, &mut slot, DropReason::Stale, &why).await;
            shared.ring.release(slot);
            continue;
        }
        buffers.swap(&mut slot);
        let (origin, pending) = work(shared, &mut slot, |slot, ctx, c| {
            process::process(slot, ctx, |s, k| c.push(s, k))
        });
        buffers.swap(&mut slot);
        // The slot goes back before the acknowledgement does, so the frame the broker sends
        // in answer to it finds a free slot.
        let a = slot.ack.take();
        shared.ring.release(slot);
        deliver_all(shared, &origin, pending).await;
        ack(shared, a).await;
    }
}

/// Runs `work` on the slot and collects what it emitted, copied out once
/// (the MQTT client needs owned buffers) so the slot can be reused as soon
/// as its work is done.
fn work(
    shared: &Shared,
    slot: &mut Slot,
    f: impl FnOnce(&mut Slot, &Ctx<'_>, &mut FrameAnswers),
) -> (Origin, FrameAnswers) {
    let mut pending = FrameAnswers(Vec::new());
    let origin = std::mem::take(&mut slot.origin);
    let models = slot.models.clone().unwrap_or_else(|| shared.registry.snapshot());
    f(slot, &shared.ctx(&models), &mut pending);
    (origin, pending)
}

async fn deliver_all(shared: &Shared, origin: &Origin, pending: FrameAnswers) {
    for (o, kind) in pending.0 {
        deliver_owned(shared, origin, o, kind).await;
    }
}

/// Messages a frame produced, owned, waiting for delivery.
struct FrameAnswers(Vec<(Outbound, Emitted)>);

impl FrameAnswers {
    fn push(&mut self, s: &Slot, kind: Emitted) {
        // A caller that asked for the picture gets it in place of the JSON result.
        if s.annotate && kind == Emitted::Result {
            return;
        }
        let o = Outbound {
            topic: s.out_topic.clone(),
            payload: process::body(s, kind).to_vec(),
            error: matches!(kind, Emitted::Error(_)),
        };
        self.0.push((o, kind));
    }
}

/// Acknowledges a delivery after everything sent for it so far.
async fn ack(shared: &Shared, a: Option<Ack>) {
    if let (Some(a), Some(out)) = (a, &shared.outbound) {
        if let (Some(k), Some(w)) = (a.key, &shared.dedup) {
            w.lock().unwrap_or_else(std::sync::PoisonError::into_inner).answered(k);
        }
        let _ = out.send(ToMqtt::Ack(a)).await;
    }
}

/// What to do with a message the window may have seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Not a repeat: process it.
    No,
    /// A repeat on a delivery of its own: acknowledge it, answer nothing.
    AckNow,
    /// The broker's repeat of a delivery still in flight: its answer will acknowledge both.
    Skip,
}

/// The redelivery policy (see `dedup.rs`): a JSON envelope carries its own
/// timestamp and ids, so a byte-identical one is a repeat whatever the broker
/// says; a raw JPEG is a repeat only when the broker marks the delivery DUP
/// and its packet id matches, since a frozen camera repeats its bytes.
fn check_repeat(w: &mut dedup::Window, topic: &str, payload: &[u8], a: &mut Ack, dup: bool) -> Repeat {
    let envelope = crate::envelope::is_json_object(payload);
    let key = dedup::key(topic.as_bytes(), payload, (!envelope).then_some(a.pkid));
    a.key = Some(key);
    if !envelope && !dup {
        w.insert(key, a.pkid);
        return Repeat::No;
    }
    match w.check(key, a.pkid) {
        Seen::New => Repeat::No,
        Seen::Answered => Repeat::AckNow,
        Seen::InFlight { pkid } if pkid == a.pkid => Repeat::Skip,
        Seen::InFlight { .. } => Repeat::AckNow,
    }
}

async fn deliver(shared: &Shared, origin: &Origin, topic: &str, body: &[u8], kind: Emitted) {
    let o = Outbound {
        topic: topic.to_owned(),
        payload: body.to_vec(),
        error: matches!(kind, Emitted::Error(_)),
    };
    deliver_owned(shared, origin, o, kind).await;
}

async fn deliver_owned(shared: &Shared, origin: &Origin, o: Outbound, kind: Emitted) {
    match origin {
        // A one-shot request gets its result; comparisons are published only.
        Origin::Reply(_) if matches!(kind, Emitted::Comparison | Emitted::Alert | Emitted::AlertPicture) => {}
        Origin::Reply(tx) => {
            let status = match kind {
                Emitted::Error(why) => why.http_status(),
                _ => 200,
            };
            let content_type = match kind {
                Emitted::Picture => "image/jpeg",
                _ => "application/json",
            };
            let _ = tx.try_send(Reply {
                status,
                body: o.payload,
                content_type,
            });
        }
        Origin::Mqtt => match &shared.outbound {
            Some(out) => {
                let counter = match kind {
                    Emitted::Error(_) => &shared.metrics.errors_published,
                    Emitted::Picture | Emitted::AlertPicture => &shared.metrics.pictures_published,
                    _ => &shared.metrics.results_published,
                };
                if out.send(ToMqtt::Publish(o)).await.is_ok() {
                    counter.fetch_add(1, Relaxed);
                }
            }
            None => log::debug!("MQTT is off; result for `{}` not published", o.topic),
        },
    }
}

/// Runs one JPEG through `model` synchronously on `slot` (the CLI's
/// one-shot path): the same ingest and processing as the service. Returns
/// every message it produced (the result or error result first, then a dual
/// comparison if any).
pub fn run_oneshot(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    max_payload: usize,
    model: usize,
    name: &str,
    jpeg: &[u8],
) -> Vec<(Vec<u8>, Emitted)> {
    run_oneshot_annotated(slot, ctx, max_payload, model, name, jpeg, false)
}

/// [`run_oneshot`], and with `annotate` the annotated picture too (`Emitted::Picture`, before
/// the result; `infer --annotate`).
pub fn run_oneshot_annotated(
    slot: &mut Slot,
    ctx: &Ctx<'_>,
    max_payload: usize,
    model: usize,
    name: &str,
    jpeg: &[u8],
    annotate: bool,
) -> Vec<(Vec<u8>, Emitted)> {
    let routes = [Route {
        model: model as u16,
        filter: 0,
    }];
    let a = match ingest::admit(name, jpeg, Some(name), max_payload, ctx.models, &routes) {
        Ok(a) => a,
        Err(e) => {
            ctx.metrics.failed(e.reason);
            let mut buf = Vec::new();
            ingest::write_early_error(&mut buf, name, jpeg, true, &e);
            return vec![(buf, Emitted::Error(Refusal::Failed(e.reason)))];
        }
    };
    slot.reset();
    slot.routes.extend_from_slice(&routes);
    slot.annotate = annotate;
    let mut out = Vec::with_capacity(2);
    let mut keep = |s: &Slot, kind| out.push((process::body(s, kind).to_vec(), kind));
    match ingest::fill(slot, name, jpeg, &a, Origin::Mqtt) {
        Ok(()) => process::process(slot, ctx, keep),
        Err(e) => process::fail(slot, ctx, &e, &mut keep),
    }
    out
}
