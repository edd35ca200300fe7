//! With the `cuda` feature, compiles the CUDA kernels (`src/layers/cuda/kernels.cu`) to
//! PTX for the compute capability in `CUDA_COMPUTE_CAP` (default 90: H100/H200), with the
//! `nvcc` of `CUDA_HOME` or the PATH (scripts/build-cuda.sh sets both). The default build
//! needs no CUDA and does nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/layers/cuda/kernels.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| PathBuf::from(home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("src/layers/cuda/kernels.cu")
        .arg("-o")
        .arg(out.join("layers.ptx"))
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "{} failed ({s}) compiling src/layers/cuda/kernels.cu",
            nvcc.display()
        ),
        Err(e) => panic!(
            "cannot run {} ({e}): the cuda feature needs the CUDA compiler; \
             scripts/build-cuda.sh installs one",
            nvcc.display()
        ),
    }
}
