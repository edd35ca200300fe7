//! Compiles the ONNX schema with `protoc`: the one named by `PROTOC` where it is set, else the
//! one the `protoc-bin-vendored` crate ships, so that building needs no system package.

fn main() -> std::io::Result<()> {
    let mut config = prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().map_err(std::io::Error::other)?;
        config.protoc_executable(protoc);
    }
    config.compile_protos(&["src/onnx.proto3"], &["src/"])?;
    Ok(())
}
