//! Which device trains: the names a user writes (`auto`, `cpu`, `cuda`, `cuda:N`) and the
//! names records and logs carry.

use candle_core::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {name:?}: expected cuda:N")]
    Index { name: String },
    #[error("unknown device {name:?}: expected auto, cpu, cuda or cuda:N")]
    Unknown { name: String },
    #[error("device {name}: this build or this machine has no CUDA (build with --features cuda)")]
    NoCuda {
        name: String,
        #[source]
        source: candle_core::Error,
    },
}

/// `auto` (CUDA when present, else the CPU, logged), `cpu`, `cuda` or `cuda:N`.
pub fn open(name: &str) -> Result<Device, DeviceError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            let device = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
            tracing::info!(device = %self::name(&device), "device chosen automatically");
            Ok(device)
        }
        other => {
            let index = match other.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse::<usize>().ok())
                    .ok_or_else(|| DeviceError::Index { name: other.into() })?,
                None => return Err(DeviceError::Unknown { name: other.into() }),
            };
            Device::new_cuda(index).map_err(|source| DeviceError::NoCuda {
                name: other.into(),
                source,
            })
        }
    }
}

/// How a device is named in records and logs (`cpu`, `cuda:0`).
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Bytes the device can give a new training now: on the CPU, what the kernel says is
/// available without swapping. `None` where it cannot be known cheaply (CUDA: an allocation
/// the device cannot serve fails the child with the driver's error instead).
pub fn free_memory(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return None;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo.lines().find_map(|line| {
        let kib = line
            .strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(open("cpu").unwrap().is_cpu());
        assert_eq!(name(&Device::Cpu), "cpu");
        assert!(free_memory(&Device::Cpu).is_some_and(|b| b > 1 << 20));
        for (bad, says) in [("tpu", "unknown device"), ("cuda:x", "expected cuda:N")] {
            let err = open(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
