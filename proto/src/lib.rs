//! Natter's wire contract. Every message and service is defined once, in
//! `proto/natter/*.proto`; this crate only includes the generated code.

#![allow(clippy::all, missing_docs)]

/// Raft transport between nodes and the node data/admin API.
pub mod cluster {
    tonic::include_proto!("natter.cluster");
}

/// The messaging model: replicated commands, queries and stored rows.
pub mod model {
    tonic::include_proto!("natter.model");
}

/// The client API over gRPC (mobile apps, the SDK, the CLI).
pub mod client {
    tonic::include_proto!("natter.client");
}
