//! Natter's wire contract. Every message and service is defined once, in
//! `proto/natter/*.proto`; this crate includes the generated code, and
//! [`mux`], the calling side of the contract's multiplexed streams.

/// Raft transport between nodes and the node data/admin API.
#[allow(clippy::all, missing_docs)]
pub mod cluster {
    tonic::include_proto!("natter.cluster");
}

/// The messaging model: replicated commands, queries and stored rows.
#[allow(clippy::all, missing_docs)]
pub mod model {
    tonic::include_proto!("natter.model");
}

/// The client API over gRPC (mobile apps, the SDK, the CLI).
#[allow(clippy::all, missing_docs)]
pub mod client {
    tonic::include_proto!("natter.client");
}

pub mod mux;
