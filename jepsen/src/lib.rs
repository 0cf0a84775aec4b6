//! natter-jepsen: a fault-injection suite for Natter. Real node processes
//! (in their own network namespaces when permitted), a recorded workload, a
//! seeded schedule of faults, and linear-time checkers over the history.
//!
//! - [`hosts`]: network namespaces / loopback, partitions;
//! - [`nemesis`]: the faults;
//! - [`workload`]: the client processes and the client trait;
//! - [`history`]: the recorded operations (JSON lines);
//! - [`checker`]: the checkers;
//! - [`runner`]: one nemesis run end to end;
//! - [`report`]: the results table.

pub mod checker;
pub mod history;
pub mod hosts;
pub mod nemesis;
pub mod proxy;
pub mod report;
pub mod router_client;
pub mod runner;
pub mod workload;
