//! `natter-node`: one storage node of a Natter cluster.

use anyhow::Result;
use clap::Parser;

/// mimalloc, not glibc malloc (README "Dependencies"): measured together
/// with the router's switch, which was reverted for memory; the node's
/// share alone is not yet measured.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let flags = natter_node::config::Flags::parse();
    let cfg = natter_node::config::Config::load(flags)?;
    natter_node::init_tracing(cfg.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(natter_node::run(cfg))
}
