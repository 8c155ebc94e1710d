//! ai-edge-inference: camera snapshots in over MQTT (or HTTP), JSON results out.
//!
//! See `ARCHITECTURE.md` for the map; each module's first comment says what
//! it owns. The binary (`main.rs`) only parses the command line and calls
//! into `service`.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod alerts;
pub mod alloc_count;
pub mod annotate;
pub mod backend;
pub mod bench;
pub mod build_info;
pub mod cameras;
pub mod config;
pub mod decode;
pub mod dedup;
pub mod envelope;
pub mod filewatch;
pub mod frame;
pub mod hash;
pub mod health;
pub mod http;
pub mod ingest;
pub mod json;
pub mod logging;
pub mod memory;
pub mod messages;
pub mod metrics;
pub mod models;
pub mod mqtt;
pub mod notify;
pub mod pipeline;
pub mod postprocess;
pub mod preprocess;
pub mod process;
pub mod registry;
pub mod result;
pub mod sensor;
pub mod service;
pub mod topic;
pub mod tracks;
pub mod zones;
