//! Generates the gRPC code from proto/ with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // It carries connection strings with passwords: Debug is written by hand, redacted.
    config.skip_debug(["schemashift.v1.RegisterReply"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "schemashift/v1/coordinator.proto",
            "schemashift/v1/change.proto",
        ],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=schemashift/v1/coordinator.proto");
    println!("cargo:rerun-if-changed=schemashift/v1/change.proto");
    Ok(())
}
