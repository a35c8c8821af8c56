//! Compiles the .proto contracts with protox, a pure-Rust protobuf compiler, so that building
//! needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/voxelfleet.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Collective payloads stay as `Bytes`: no copy into a Vec<u8> per chunk.
        .bytes(".voxelfleet.v1.CollectiveChunk.data")
        .compile_fds(descriptors)?;
    Ok(())
}
