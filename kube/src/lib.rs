//! Thin kube-rs glue shared by the agent and the coordinator: logging setup, the health and
//! metrics endpoint, Event publishing, Node patch helpers and wall-clock time. Decisions live in
//! `klm-protocol`; this crate only performs I/O.

pub mod cli;
pub mod client;
pub mod events;
pub mod health;
pub mod lease;
pub mod logging;
pub mod metrics;
pub mod nodes;
pub mod retry;
pub mod status_view;
pub mod time;
pub mod watch;
