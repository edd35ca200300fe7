//! Which implementation the layers of a model run. Whoever builds the model chooses (a
//! command's flags, a benchmark, a test) and the model carries the choice to every layer and
//! to its optimiser; no kernel reads a global switch or the environment, so two models in one
//! process can run different kernels and a test says which it checks.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The implementation of convolution, batch norm, the skip addition, the classifier and the
/// SGD update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The project's CPU kernels (`layers::cpu`).
    Cpu,
    /// The CUDA ops (`layers::cuda`): their kernels on a GPU, their reference twins on the CPU.
    Cuda,
    /// Candle's composed operations: the reference both are checked against, and the path of
    /// devices without kernels of ours.
    Composed,
}

/// How CUDA convolutions run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaConvolution {
    /// im2col + cuBLAS GEMMs, the column matrix shared by the forward pass and the weight
    /// gradient.
    #[default]
    Gemm,
    /// cuDNN, each pass with the algorithm that measured fastest for its shape; only in a
    /// build with the `cudnn` feature.
    Cudnn,
}

/// How CPU convolutions run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuConvolution {
    /// Winograd where the shape takes it (stride 1, 3 or 5 taps, 8 or more channels), im2col
    /// + GEMM elsewhere.
    #[default]
    Auto,
    /// im2col + GEMM everywhere: the baseline Winograd is measured against
    /// (`trainer bench --ops --cpu-conv im2col`).
    Im2col,
}

/// The choice of kernels for one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernels {
    /// Every layer on this path whatever the device; `None`: the project's kernels for the
    /// device (CPU or CUDA), Candle's composed operations on any other.
    pub path: Option<Path>,
    pub cpu_convolution: CpuConvolution,
    pub cuda_convolution: CudaConvolution,
    /// Sample groups of a CUDA im2col convolution (1: never group); `None`: chosen by shape.
    pub conv_groups: Option<usize>,
}

impl Kernels {
    /// Candle's composed operations everywhere: what `bench --composed` measures the
    /// kernels against.
    pub const COMPOSED: Kernels = Kernels::on(Path::Composed);

    /// Every layer on `path`, whatever the device.
    pub const fn on(path: Path) -> Self {
        Self {
            path: Some(path),
            cpu_convolution: CpuConvolution::Auto,
            cuda_convolution: CudaConvolution::Gemm,
            conv_groups: None,
        }
    }

    /// The path a layer takes on `device`.
    pub fn path(&self, device: &Device) -> Path {
        match self.path {
            Some(path) => path,
            None if device.is_cpu() => Path::Cpu,
            None if device.is_cuda() => Path::Cuda,
            None => Path::Composed,
        }
    }
}

/// A CUDA convolution this build cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaConvolutionError {
    #[error("unknown CUDA convolution {name:?}: expected gemm or cudnn")]
    Unknown { name: String },
    #[error(
        "cuDNN convolutions need a build with the cudnn feature (cargo build --features cudnn)"
    )]
    NoCudnn,
}

impl FromStr for CudaConvolution {
    type Err = CudaConvolutionError;

    fn from_str(s: &str) -> Result<Self, CudaConvolutionError> {
        match s {
            "gemm" | "im2col" => Ok(Self::Gemm),
            "cudnn" if cfg!(feature = "cudnn") => Ok(Self::Cudnn),
            "cudnn" => Err(CudaConvolutionError::NoCudnn),
            other => Err(CudaConvolutionError::Unknown { name: other.into() }),
        }
    }
}

/// A CPU convolution that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU convolution {name:?}: expected auto or im2col")]
pub struct UnknownCpuConvolution {
    pub name: String,
}

impl FromStr for CpuConvolution {
    type Err = UnknownCpuConvolution;

    fn from_str(s: &str) -> Result<Self, UnknownCpuConvolution> {
        match s {
            "auto" | "winograd" => Ok(Self::Auto),
            "im2col" | "gemm" => Ok(Self::Im2col),
            other => Err(UnknownCpuConvolution { name: other.into() }),
        }
    }
}

impl fmt::Display for CpuConvolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CpuConvolution::Auto => "auto",
            CpuConvolution::Im2col => "im2col",
        })
    }
}

impl fmt::Display for CudaConvolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CudaConvolution::Gemm => "gemm",
            CudaConvolution::Cudnn => "cudnn",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_decides_unless_a_path_is_chosen() {
        assert_eq!(Kernels::default().path(&Device::Cpu), Path::Cpu);
        assert_eq!(Kernels::COMPOSED.path(&Device::Cpu), Path::Composed);
        assert_eq!(Kernels::on(Path::Cuda).path(&Device::Cpu), Path::Cuda);
        assert_eq!("gemm".parse(), Ok(CudaConvolution::Gemm));
        assert_eq!("im2col".parse(), Ok(CpuConvolution::Im2col));
        assert!("fft".parse::<CpuConvolution>().is_err());
        assert!("winograd".parse::<CudaConvolution>().is_err());
        assert_eq!(
            "cudnn".parse::<CudaConvolution>().is_ok(),
            cfg!(feature = "cudnn")
        );
    }
}
