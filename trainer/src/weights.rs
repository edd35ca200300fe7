//! Named tensors: what an individual's training leaves behind and what its children inherit
//! (§3.6). Names are built from the DNA's stable ids (`edge7.weight`, `vertex3.gamma`), so a
//! child finds its parent's tensor for the same layer by name and keeps it if the shape still
//! matches; everything else starts fresh, initialised as He et al. (2015).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use rand_distr::{Distribution, Normal};

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("weights {what}: {source}")]
    Tensor {
        what: String,
        source: candle_core::Error,
    },
    #[error("cannot read weights file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write weights file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A snapshot of every tensor of a model (trainable parameters and batch-norm statistics).
#[derive(Clone, Debug, Default)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn insert(&mut self, name: String, tensor: Tensor) {
        self.tensors.insert(name, tensor);
    }

    /// Number of scalars over all tensors.
    pub fn scalar_count(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }

    /// The safetensors encoding, as stored next to an individual's DNA.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, WeightsError> {
        let tensors: Vec<(&str, &Tensor)> =
            self.tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        safetensors::serialize(tensors, None).map_err(|e| WeightsError::Tensor {
            what: "encoding".into(),
            source: candle_core::Error::Msg(e.to_string()),
        })
    }

    pub fn from_safetensors(bytes: &[u8], device: &Device) -> Result<Self, WeightsError> {
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|source| {
            WeightsError::Tensor {
                what: "decoding".into(),
                source,
            }
        })?;
        Ok(Self {
            tensors: tensors.into_iter().collect(),
        })
    }

    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        let bytes = self.to_safetensors()?;
        std::fs::write(path, bytes).map_err(|source| WeightsError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn load(path: &Path, device: &Device) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors(&bytes, device).map_err(|e| match e {
            WeightsError::Tensor { source, .. } => WeightsError::Tensor {
                what: format!("file {}", path.display()),
                source,
            },
            other => other,
        })
    }
}

/// How a tensor that cannot be inherited starts.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// He et al. (2015): normal with standard deviation sqrt(2 / fan_in), for ReLU networks.
    He {
        fan_in: usize,
    },
    Zeros,
    Ones,
}

/// Where each tensor of a newly built model came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inheritance {
    pub inherited: Vec<String>,
    pub fresh: Vec<String>,
}

/// The variables of a model being built: inherited where name and shape match, fresh otherwise.
pub struct Parameters<'a, R: Rng> {
    parent: Option<&'a Weights>,
    rng: &'a mut R,
    device: Device,
    vars: BTreeMap<String, Var>,
    trainable: Vec<Var>,
    inheritance: Inheritance,
}

impl<'a, R: Rng> Parameters<'a, R> {
    pub fn new(parent: Option<&'a Weights>, rng: &'a mut R, device: &Device) -> Self {
        Self {
            parent,
            rng,
            device: device.clone(),
            vars: BTreeMap::new(),
            trainable: Vec::new(),
            inheritance: Inheritance::default(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The variable `name` of `shape`: the parent's tensor if it has one of that shape,
    /// otherwise a fresh one. Trainable variables go to the optimizer; the rest (batch-norm
    /// running statistics) are only saved and inherited.
    pub fn var(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        trainable: bool,
    ) -> Result<Var, WeightsError> {
        let err = |source| WeightsError::Tensor {
            what: name.clone(),
            source,
        };
        let inherited = self
            .parent
            .and_then(|p| p.get(&name))
            .filter(|t| t.dims() == shape && t.dtype() == DType::F32);
        let tensor = match inherited {
            Some(t) => {
                self.inheritance.inherited.push(name.clone());
                t.to_device(&self.device).map_err(err)?
            }
            None => {
                self.inheritance.fresh.push(name.clone());
                self.fresh(shape, init).map_err(err)?
            }
        };
        // A copy, so that training the child never writes into the parent's tensors.
        let var = Var::from_tensor(&tensor.copy().map_err(err)?).map_err(err)?;
        if trainable {
            self.trainable.push(var.clone());
        }
        self.vars.insert(name, var.clone());
        Ok(var)
    }

    fn fresh(&mut self, shape: &[usize], init: Init) -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        match init {
            Init::Zeros => Tensor::zeros(shape, DType::F32, &self.device),
            Init::Ones => Tensor::ones(shape, DType::F32, &self.device),
            Init::He { fan_in } => {
                let std = (2.0 / fan_in.max(1) as f32).sqrt();
                let normal = Normal::new(0.0f32, std).expect("finite standard deviation");
                let values: Vec<f32> = (0..n).map(|_| normal.sample(self.rng)).collect();
                Tensor::from_vec(values, shape, &self.device)
            }
        }
    }

    pub fn finish(self) -> (ModelVars, Inheritance) {
        (
            ModelVars {
                all: self.vars,
                trainable: self.trainable,
            },
            self.inheritance,
        )
    }
}

/// All variables of a built model.
#[derive(Clone, Debug)]
pub struct ModelVars {
    all: BTreeMap<String, Var>,
    trainable: Vec<Var>,
}

impl ModelVars {
    pub fn trainable(&self) -> &[Var] {
        &self.trainable
    }

    pub fn snapshot(&self) -> Weights {
        Weights {
            tensors: self
                .all
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect(),
        }
    }

    pub fn trainable_scalars(&self) -> usize {
        self.trainable.iter().map(|v| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use population::seed::{rng, Stream};

    fn values(weights: &Weights, name: &str) -> Vec<f32> {
        let tensor = weights.get(name).expect("a tensor of that name");
        tensor.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn inherits_by_name_and_shape_only() {
        let device = Device::Cpu;
        let mut r = rng(0, Stream::Initialisation);
        let mut parent = Parameters::new(None, &mut r, &device);
        parent
            .var("a".into(), &[2, 3], Init::He { fan_in: 3 }, true)
            .unwrap();
        parent.var("b".into(), &[4], Init::Ones, false).unwrap();
        let (vars, _) = parent.finish();
        let weights = vars.snapshot();

        let mut child = Parameters::new(Some(&weights), &mut r, &device);
        let a = child.var("a".into(), &[2, 3], Init::Zeros, true).unwrap();
        child.var("b".into(), &[5], Init::Zeros, false).unwrap();
        child.var("c".into(), &[1], Init::Zeros, true).unwrap();
        let (child_vars, inheritance) = child.finish();
        assert_eq!(inheritance.inherited, vec!["a"]);
        assert_eq!(inheritance.fresh, vec!["b", "c"]);
        assert_eq!(child_vars.trainable().len(), 2);
        let same = a.as_tensor().eq(weights.get("a").unwrap()).unwrap();
        assert_eq!(same.sum_all().unwrap().to_scalar::<u8>().unwrap(), 6);
    }

    #[test]
    fn he_init_has_the_right_spread() {
        let device = Device::Cpu;
        let mut r = rng(3, Stream::Initialisation);
        let mut p = Parameters::new(None, &mut r, &device);
        let v = p
            .var("w".into(), &[64, 32, 3, 3], Init::He { fan_in: 288 }, true)
            .unwrap();
        let std: f32 = v
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        let expected = (2.0f32 / 288.0).sqrt();
        assert!((std / expected - 1.0).abs() < 0.05, "{std} vs {expected}");
    }

    #[test]
    fn safetensors_round_trip_is_bit_exact() {
        let device = Device::Cpu;
        let mut r = rng(5, Stream::Initialisation);
        let mut p = Parameters::new(None, &mut r, &device);
        p.var("w".into(), &[3, 4], Init::He { fan_in: 4 }, true)
            .unwrap();
        let (vars, _) = p.finish();
        let w = vars.snapshot();
        let back = Weights::from_safetensors(&w.to_safetensors().unwrap(), &device).unwrap();
        let a = values(&w, "w");
        let b = values(&back, "w");
        assert_eq!(a, b);
    }

    #[test]
    fn corrupt_weights_are_an_error_not_a_panic() {
        let err = Weights::from_safetensors(b"not safetensors", &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("decoding"), "{err}");
    }
}
