//! What every stage shares about a frame, the frame slots, and the ring that
//! recycles them.
//!
//! Owns: a frame's `Route`s, its `FrameError`, the slot sizes (`Limits`,
//! from the models), where a frame came from (`Slot::source`), the
//! preallocated per-frame buffers (message copy, JPEG bytes, decoded RGB,
//! model tensor, scratch, result JSON) and the ring that moves slots between
//! "free" and "waiting for a worker": a new frame waits for a slot when every
//! one is taken; only a newer frame of the same camera makes a waiting one
//! give way. Every buffer is sized once at start-up; nothing here grows on
//! the frame path. Does not decode, infer or deliver (the stages do).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::config::model::MAX_SENSOR_INPUT;
use crate::decode::{Decoded, BUFFER_BYTES_PER_PIXEL};
use crate::envelope::EnvelopeError;
use crate::envelope::Form;
use crate::health;
use crate::messages::{Ack, Reply};
use crate::metrics::FailReason;
use crate::metrics::{DropReason, Metrics};
use crate::models::{Models, Runner, MAX_MODELS};
use crate::preprocess;
use crate::result::Source;

/// A model a frame goes to, and which of its input filters matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub model: u16,
    pub filter: u16,
}

/// Why a frame gets an error result; `detail` is for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub reason: FailReason,
    pub detail: String,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

impl FrameError {
    pub fn new(reason: FailReason, detail: impl std::fmt::Display) -> FrameError {
        FrameError {
            reason,
            detail: detail.to_string(),
        }
    }
}

impl From<EnvelopeError> for FrameError {
    fn from(e: EnvelopeError) -> FrameError {
        let reason = match e {
            EnvelopeError::BadJson(_) => FailReason::BadJson,
            EnvelopeError::BadBase64(_) => FailReason::BadBase64,
            EnvelopeError::BadField { .. } | EnvelopeError::UnsupportedSchema => FailReason::BadEnvelope,
        };
        FrameError::new(reason, e)
    }
}

/// Longest topic and device id a slot holds (longer ones are refused).
pub const MAX_TOPIC_LEN: usize = 1024;
pub const MAX_DEVICE_LEN: usize = 256;
/// Room for one result message.
pub const RESULT_CAPACITY: usize = 64 * 1024;

/// Sizes every slot is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_payload: usize,
    pub max_width: u32,
    pub max_height: u32,
    /// Largest model tensor, in f32 values.
    pub max_tensor: usize,
    /// Widest model input, in pixels.
    pub max_input_width: usize,
    /// Room for an annotated JPEG: the largest `annotations.max_bytes` of the models.
    pub max_picture: usize,
}

impl Limits {
    /// Slot sizes for a set of models and the payload and image limits.
    pub fn for_models(models: &Models, max_payload: usize, max_width: u32, max_height: u32) -> Limits {
        let pre = models.list.iter().map(|m| &m.config.preprocessing);
        Limits {
            max_payload,
            max_width,
            max_height,
            max_tensor: models
                .list
                .iter()
                .filter(|m| matches!(m.runner, Runner::Ml(_)))
                .map(|m| m.config.input_len())
                .max()
                .unwrap_or(0)
                .max(MAX_SENSOR_INPUT),
            max_input_width: pre.map(|p| p.width as usize).max().unwrap_or(0),
            max_picture: models
                .list
                .iter()
                .map(|m| m.config.annotations.max_bytes)
                .max()
                .unwrap_or(crate::config::model::DEFAULT_PICTURE_BYTES),
        }
    }

    /// Whether a model with this preprocessing fits slots of these sizes.
    pub fn fits(&self, p: &crate::config::model::Preprocessing) -> bool {
        preprocess::tensor_len(p) <= self.max_tensor && p.width as usize <= self.max_input_width
    }
}

/// Who waits for the frame's answer.
#[derive(Debug, Default)]
pub enum Origin {
    #[default]
    Mqtt,
    /// `POST /infer` (or the CLI): the answer goes back on this channel.
    Reply(async_channel::Sender<Reply>),
}

/// One frame's buffers and identity.
pub struct Slot {
    pub origin: Origin,
    /// The model set this frame was routed with; it finishes on it even if a
    /// reload swaps in a newer one meanwhile.
    pub models: Option<std::sync::Arc<crate::models::Models>>,
    /// Acknowledged after the frame's answer is handed to the client.
    pub ack: Option<Ack>,
    pub form: Form,
    /// Place in line in the ring (a superseding frame keeps its predecessor's).
    pub seq: u64,
    pub received_at: Instant,
    /// When the frame was taken: the envelope's `timestamp` when it has one,
    /// else its arrival. Judged against `MAX_FRAME_AGE_S`.
    pub taken_at: SystemTime,
    pub topic: String,
    pub device: String,
    pub routes: Vec<Route>,
    /// Copy of the incoming message; envelope fields are ranges into it.
    pub payload: Vec<u8>,
    pub payload_len: usize,
    pub timestamp_json: Option<Range<usize>>,
    pub metadata_json: Option<Range<usize>>,
    pub correlation_id_json: Option<Range<usize>>,
    pub location_json: Option<Range<usize>>,
    /// Where the JPEG is: in `payload` (raw form) or decoded from base64 into `jpeg`.
    pub jpeg_range: Range<usize>,
    pub jpeg_in_payload: bool,
    pub jpeg: Vec<u8>,
    pub b64_scratch: Vec<u8>,
    /// Decoded pixels: room for a decoder's RGBA output, packed to RGB8 in place.
    pub rgb: Vec<u8>,
    /// Where a picture with an EXIF orientation is turned upright (then swapped with `rgb`).
    pub rgb_spare: Vec<u8>,
    pub decoded: Decoded,
    pub tensor: Vec<f32>,
    pub pre_scratch: preprocess::Scratch,
    pub health_scratch: health::Scratch,
    /// A one-shot caller wants the annotated picture as its answer (`annotate.rs`).
    pub annotate: bool,
    /// An annotated JPEG being built (lent by the worker, like `rgb`; its canvas is `rgb_spare`).
    pub picture: Vec<u8>,
    /// The result message being built.
    pub out: Vec<u8>,
    pub out_topic: String,
    /// A sensor reading: each route's window, concatenated (filled by the ingest task, which
    /// keeps the windows in arrival order), and per route where its window starts and how
    /// many readings it holds (`window.len() < window size`: still filling, not inferred).
    pub reading: Vec<f32>,
    pub reading_windows: Vec<ReadingWindow>,
}

/// One route's window in [`Slot::reading`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingWindow {
    pub start: usize,
    pub len: usize,
    /// Readings the device's window holds now, and how many it takes.
    pub filled: usize,
    pub size: usize,
}

impl Slot {
    pub fn new(l: &Limits) -> Slot {
        Slot {
            origin: Origin::Mqtt,
            models: None,
            ack: None,
            form: Form::RawJpeg,
            seq: 0,
            received_at: Instant::now(),
            taken_at: SystemTime::UNIX_EPOCH,
            topic: String::with_capacity(MAX_TOPIC_LEN),
            device: String::with_capacity(MAX_DEVICE_LEN),
            routes: Vec::with_capacity(MAX_MODELS),
            payload: vec![0; l.max_payload],
            payload_len: 0,
            timestamp_json: None,
            metadata_json: None,
            correlation_id_json: None,
            location_json: None,
            jpeg_range: 0..0,
            jpeg_in_payload: true,
            // Base64 decodes to at most 3/4 of the payload.
            jpeg: vec![0; l.max_payload / 4 * 3 + 3],
            b64_scratch: Vec::with_capacity(l.max_payload),
            // Zeroed allocations: the pages are resident only once a decoder writes them.
            rgb: vec![0; l.max_width as usize * l.max_height as usize * BUFFER_BYTES_PER_PIXEL],
            // As large as `rgb`: the two trade places when a picture is turned upright.
            rgb_spare: vec![0; l.max_width as usize * l.max_height as usize * BUFFER_BYTES_PER_PIXEL],
            decoded: Decoded::default(),
            tensor: vec![0.0; l.max_tensor],
            // An upright image may be as wide as the stored one is high.
            pre_scratch: preprocess::Scratch::for_frames(
                l.max_width.max(l.max_height) as usize,
                l.max_width.max(l.max_height) as usize,
                l.max_input_width,
                l.max_input_width,
            ),
            // An upright image may be as wide as the stored one is high.
            health_scratch: health::Scratch::with_capacity(l.max_width.max(l.max_height) as usize),
            annotate: false,
            // Reserved, not touched: pages become resident only once a picture is written.
            picture: Vec::with_capacity(l.max_picture),
            out: Vec::with_capacity(RESULT_CAPACITY),
            out_topic: String::with_capacity(MAX_TOPIC_LEN),
            // Grown by the first sensor reading the slot carries, then reused.
            reading: Vec::new(),
            reading_windows: Vec::with_capacity(MAX_MODELS),
        }
    }

    /// A slot for the ring: the buffers only a frame in a worker needs (RGB,
    /// tensor, scratch) are left empty; each worker lends its own
    /// ([`WorkBuffers::swap`]), so there are as many of them as workers, not slots.
    pub fn for_ring(l: &Limits) -> Slot {
        let mut s = Slot::new(&Limits {
            max_width: 0,
            max_height: 0,
            max_tensor: 0,
            max_input_width: 0,
            max_picture: 0,
            ..*l
        });
        s.rgb = Vec::new();
        s.rgb_spare = Vec::new();
        s
    }

    /// Raw JSON of an envelope field kept as a range into the payload.
    pub fn field(&self, r: &Option<Range<usize>>) -> Option<&[u8]> {
        r.as_ref().map(|r| &self.payload[r.clone()])
    }

    /// Where the frame came from, as results report it.
    pub fn source(&self) -> Source<'_> {
        Source {
            device_id: Some(self.device.as_str()),
            form: self.form.as_str(),
            topic: &self.topic,
            timestamp_json: self.field(&self.timestamp_json),
            correlation_id_json: self.field(&self.correlation_id_json),
            location_json: self.field(&self.location_json),
            metadata_json: self.field(&self.metadata_json),
        }
    }

    /// Forgets the previous frame (keeps every buffer).
    pub fn reset(&mut self) {
        self.origin = Origin::Mqtt;
        self.models = None;
        self.ack = None;
        self.annotate = false;
        self.topic.clear();
        self.device.clear();
        self.routes.clear();
        self.payload_len = 0;
        self.timestamp_json = None;
        self.metadata_json = None;
        self.correlation_id_json = None;
        self.location_json = None;
        self.jpeg_range = 0..0;
        self.jpeg_in_payload = true;
        self.decoded = Decoded::default();
        self.reading.clear();
        self.reading_windows.clear();
    }
}

/// A worker's own buffers for the frame it works on: decoded RGB, the model
/// tensor and the preprocessing and health scratch. Allocated once per
/// worker (they are the largest part of a frame's memory) and swapped into
/// the slot for the work, then back.
pub struct WorkBuffers {
    rgb: Vec<u8>,
    rgb_spare: Vec<u8>,
    picture: Vec<u8>,
    tensor: Vec<f32>,
    pre_scratch: preprocess::Scratch,
    health_scratch: health::Scratch,
}

impl WorkBuffers {
    pub fn new(l: &Limits) -> WorkBuffers {
        let s = Slot::new(l);
        WorkBuffers {
            rgb: s.rgb,
            rgb_spare: s.rgb_spare,
            picture: s.picture,
            tensor: s.tensor,
            pre_scratch: s.pre_scratch,
            health_scratch: s.health_scratch,
        }
    }

    /// Lends these buffers to `slot` (or takes them back: the same swap).
    pub fn swap(&mut self, slot: &mut Slot) {
        std::mem::swap(&mut self.rgb, &mut slot.rgb);
        std::mem::swap(&mut self.rgb_spare, &mut slot.rgb_spare);
        std::mem::swap(&mut self.picture, &mut slot.picture);
        std::mem::swap(&mut self.tensor, &mut slot.tensor);
        std::mem::swap(&mut self.pre_scratch, &mut slot.pre_scratch);
        std::mem::swap(&mut self.health_scratch, &mut slot.health_scratch);
    }
}

/// The ring: free slots, and frames waiting for a worker, oldest first.
///
/// Flow control, not eviction: a frame that finds every slot taken waits
/// for one ([`Ring::free`]); the MQTT session's Receive Maximum keeps the
/// broker from sending more than the service holds, so the broker is the
/// buffer. The only frame that gives way is one still waiting when every
/// slot is busy and a newer frame of the same camera arrives
/// ([`Ring::supersede`]); the newer one takes its slot and its place in line.
pub struct Ring {
    free_tx: async_channel::Sender<Box<Slot>>,
    free_rx: async_channel::Receiver<Box<Slot>>,
    waiting: Mutex<VecDeque<Box<Slot>>>,
    /// One token per waiting frame (at most; a superseded frame may leave a spare).
    ready_tx: async_channel::Sender<()>,
    ready_rx: async_channel::Receiver<()>,
    /// Place in line of the next new frame.
    next_seq: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

impl Ring {
    pub fn new(slots: usize, limits: &Limits, metrics: Arc<Metrics>) -> Ring {
        let (free_tx, free_rx) = async_channel::bounded(slots);
        for _ in 0..slots {
            let _ = free_tx.try_send(Box::new(Slot::for_ring(limits)));
        }
        let (ready_tx, ready_rx) = async_channel::bounded(slots);
        metrics.slots_total.store(slots as u64, Relaxed);
        metrics.slots_free.store(slots as u64, Relaxed);
        Ring {
            free_tx,
            free_rx,
            waiting: Mutex::new(VecDeque::with_capacity(slots)),
            ready_tx,
            ready_rx,
            next_seq: std::sync::atomic::AtomicU64::new(0),
            metrics,
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<Slot>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The frame of `device` still waiting for a worker, taken out of line
    /// so a newer frame of the same camera can have its slot and its place
    /// (the slot keeps `seq`). Counted as `superseded`.
    pub fn supersede(&self, device: &str) -> Option<Box<Slot>> {
        let mut w = self.waiting();
        // A sensor reading is never superseded: its device's window already holds it.
        let i = w.iter().position(|s| s.device == device && s.form != Form::Reading)?;
        let slot = w.remove(i)?;
        // Its token stays behind unless we take one; a spare token only costs a worker a look.
        let _ = self.ready_rx.try_recv();
        self.metrics.queue_waiting.store(w.len() as u64, Relaxed);
        self.metrics.dropped(DropReason::Superseded);
        Some(slot)
    }

    /// A free slot, if one is in the pool now.
    pub fn try_free(&self) -> Option<Box<Slot>> {
        let mut s = self.free_rx.try_recv().ok()?;
        self.metrics.slots_free.fetch_sub(1, Relaxed);
        s.seq = self.next_seq.fetch_add(1, Relaxed);
        Some(s)
    }

    /// Waits for a slot to come back from a worker; `None` once the ring is gone.
    pub async fn free(&self) -> Option<Box<Slot>> {
        let mut s = self.free_rx.recv().await.ok()?;
        self.metrics.slots_free.fetch_sub(1, Relaxed);
        s.seq = self.next_seq.fetch_add(1, Relaxed);
        Some(s)
    }

    /// Queues a filled slot for the workers, in its place in line (`seq`).
    pub fn push(&self, slot: Box<Slot>) {
        let mut w = self.waiting();
        let at = w.iter().rposition(|s| s.seq < slot.seq).map_or(0, |i| i + 1);
        w.insert(at, slot);
        self.metrics.queue_waiting.store(w.len() as u64, Relaxed);
        drop(w);
        let _ = self.ready_tx.try_send(());
    }

    /// The oldest waiting frame; `None` once the ring is closed and drained.
    pub async fn next(&self) -> Option<Box<Slot>> {
        loop {
            if self.ready_rx.recv().await.is_err() {
                let mut w = self.waiting();
                let s = w.pop_front();
                self.metrics.queue_waiting.store(w.len() as u64, Relaxed);
                return s;
            }
            let mut w = self.waiting();
            if let Some(s) = w.pop_front() {
                self.metrics.queue_waiting.store(w.len() as u64, Relaxed);
                return Some(s);
            }
        }
    }

    /// Returns a slot to the free pool.
    pub fn release(&self, mut slot: Box<Slot>) {
        slot.reset();
        if self.free_tx.try_send(slot).is_ok() {
            self.metrics.slots_free.fetch_add(1, Relaxed);
        }
    }

    /// Stops the workers once the waiting frames are done.
    pub fn close(&self) {
        self.ready_tx.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_payload: 1024,
            max_width: 8,
            max_height: 8,
            max_tensor: 12,
            max_input_width: 2,
            max_picture: 0,
        }
    }

    /// What ingest does: a free slot, else the camera's waiting frame gives way.
    fn filled(ring: &Ring, device: &str) -> Option<bool> {
        let (mut s, superseded) = match ring.try_free() {
            Some(s) => (s, false),
            None => (ring.supersede(device)?, true),
        };
        let seq = s.seq;
        s.reset();
        s.seq = seq;
        s.device.push_str(device);
        ring.push(s);
        Some(superseded)
    }

    fn drain(ring: &Ring, n: usize) -> Vec<String> {
        smol::block_on(async {
            let mut v = Vec::new();
            for _ in 0..n {
                let s = ring.next().await.unwrap();
                v.push(s.device.clone());
                ring.release(s);
            }
            v
        })
    }

    #[test]
    fn a_full_ring_waits_and_never_evicts_another_camera() {
        let m = Arc::new(Metrics::default());
        let ring = Ring::new(3, &limits(), m.clone());
        assert_eq!(filled(&ring, "a"), Some(false));
        assert_eq!(filled(&ring, "b"), Some(false));
        assert_eq!(filled(&ring, "c"), Some(false));
        // Full: a fourth camera gets no slot (it waits for one), and nobody is dropped.
        assert_eq!(filled(&ring, "d"), None);
        assert_eq!(m.dropped.iter().map(|d| d.load(Relaxed)).sum::<u64>(), 0);
        let first = smol::block_on(ring.next()).unwrap();
        assert_eq!(first.device, "a");
        ring.release(first);
        assert_eq!(smol::block_on(ring.free()).map(|s| s.device.is_empty()), Some(true));
    }

    #[test]
    fn a_newer_frame_of_the_same_camera_takes_the_waiting_ones_place() {
        let m = Arc::new(Metrics::default());
        let ring = Ring::new(3, &limits(), m.clone());
        filled(&ring, "a");
        filled(&ring, "b");
        // A slot is free: `a` again is simply queued.
        assert_eq!(filled(&ring, "a"), Some(false));
        // Full: `b` again replaces b's waiting frame, and keeps its place in line.
        assert_eq!(filled(&ring, "b"), Some(true));
        // Full, and `c` has nothing waiting: it gets no slot (it waits for one).
        assert_eq!(filled(&ring, "c"), None);
        assert_eq!(drain(&ring, 3), ["a", "b", "a"]);
        assert_eq!(m.dropped[DropReason::Superseded as usize].load(Relaxed), 1);
        assert_eq!(m.slots_free.load(Relaxed), 3);
    }

    #[test]
    fn a_frame_in_a_worker_is_never_superseded() {
        let ring = Ring::new(1, &limits(), Arc::new(Metrics::default()));
        filled(&ring, "a");
        let s = smol::block_on(ring.next()).unwrap();
        assert!(ring.supersede("a").is_none());
        assert!(ring.try_free().is_none());
        ring.release(s);
        assert!(ring.try_free().is_some());
    }
}
