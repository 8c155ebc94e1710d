//! The messages that cross threads: into the pipeline (`Incoming`, from the
//! MQTT and HTTP threads), out of it (`ToMqtt` to the MQTT publisher, `Reply`
//! to a one-shot caller), and the broker delivery a frame acknowledges (`Ack`).
//!
//! Owns: their shapes only. A leaf: both sides of each channel import it, it
//! imports neither.

use std::sync::Arc;

use bytes::Bytes;

use crate::models::Models;

/// A message for the pipeline.
pub struct Incoming {
    pub topic: Bytes,
    pub payload: Bytes,
    /// `Some` for one-shot requests: the answer goes back here.
    pub reply: Option<async_channel::Sender<Reply>>,
    /// One-shot requests name their model: an index into the model set it was
    /// looked up in, which the frame then uses. MQTT messages are routed by topic.
    pub model: Option<(Arc<Models>, usize)>,
    /// MQTT QoS 1/2 deliveries: acknowledged only once answered.
    pub ack: Option<Ack>,
    /// The broker marked this delivery as a repeat (DUP).
    pub dup: bool,
    /// A one-shot request for the annotated picture instead of the JSON result.
    pub annotate: bool,
}

/// What the MQTT publisher thread does, in order: a frame's answers are
/// queued before its acknowledgement, so an input is acknowledged only after
/// its result is with the client.
#[derive(Debug)]
pub enum ToMqtt {
    Publish(Outbound),
    Ack(Ack),
    /// Reconnected: publish the results kept while offline.
    Flush,
    /// The models' problems changed (a model failed or recovered): publish a
    /// fresh retained status. Built when published, so it is never stale.
    StatusChanged,
    /// Time for a metrics snapshot (`METRICS_INTERVAL_S`): published when connected, skipped
    /// when not (a snapshot is about now, so none is queued).
    MetricsTick,
    /// Stopping: publish what is queued and the `offline` status, then disconnect.
    Shutdown,
}

/// A message for the MQTT publisher.
#[derive(Debug)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub error: bool,
}

/// The broker's delivery to acknowledge once the frame's answer is with the
/// MQTT client (QoS 1: PUBACK; QoS 2: PUBREC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub pkid: u16,
    pub exactly_once: bool,
    /// The message's key in the redelivery window (`dedup.rs`), once admitted.
    pub key: Option<u64>,
}

/// The answer to a one-shot request: HTTP status and body (JSON, or an annotated JPEG).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub content_type: &'static str,
}
