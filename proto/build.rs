fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/canopy/v1/types.proto",
        "proto/canopy/v1/console.proto",
        "proto/canopy/v1/agent.proto",
        "proto/canopy/v1/hosted.proto",
        "proto/canopy/v1/operator.proto",
        "proto/canopy/v1/store.proto",
        "proto/canopy/v1/lock.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("canopy_v1_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
