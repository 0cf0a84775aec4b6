//! Compiles every `.proto` under `natter/` with protox (pure Rust), so no
//! system `protoc` is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("natter")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=natter");
    let fds = protox::compile(&files, ["."])?;
    tonic_prost_build::configure()
        // A send's answer carries the conversation row only for push: boxed,
        // so every model answer isn't the size of a row.
        .boxed(".natter.model.SendResult.conversation")
        .compile_fds(fds)?;
    Ok(())
}
