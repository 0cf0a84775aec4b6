//! `natter-node`: one storage node of a Natter cluster.

use anyhow::Result;
use clap::Parser;

fn main() -> Result<()> {
    let flags = natter_node::config::Flags::parse();
    let cfg = natter_node::config::Config::load(flags)?;
    natter_node::init_tracing(cfg.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(natter_node::run(cfg))
}
