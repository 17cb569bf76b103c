//! Compiles the protos with the pure-Rust `protox`, so no system `protoc` is needed, and writes
//! the encoded descriptor set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/mediacache/v1/mediacache.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("mediacache_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
