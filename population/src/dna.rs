//! The genome of an individual (paper §3.2): a graph whose vertices are activations and whose
//! edges are identity connections or convolutions, plus the learning rate.
//!
//! The graph is kept in a shape that every mutation preserves and that makes acyclicity a
//! matter of ordering: `vertices` lists the *convolutional backbone* from the input image to
//! the vertex that feeds the fully connected softmax layer. Every vertex but the input has
//! exactly one *primary* edge, coming from the vertex just before it; *skip* edges are
//! identities from an earlier vertex to a later one. All edges point forward, so the graph is
//! acyclic by construction and the backbone order is a topological order.
//!
//! Vertices and edges carry ids that are never reused within a lineage: weight inheritance
//! (§3.6) keys tensors by them, so a layer keeps its weights across mutations elsewhere.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Version of the JSON encoding. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// Learning rate of every initial individual (§3.3).
pub const INITIAL_LEARNING_RATE: f64 = 0.1;

/// Strides are `2^round(log2_stride)`; beyond this exponent every CIFAR-sized map is already
/// reduced to one pixel, so a larger stride computes the same thing and the cap only keeps
/// the arithmetic in range.
const MAX_LOG2_STRIDE: f64 = 30.0;

#[derive(Debug, thiserror::Error)]
pub enum DnaError {
    #[error(
        "DNA format version {found} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u32 },
    #[error("invalid DNA: {0}")]
    Invalid(String),
    #[error("DNA is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot read DNA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("DNA file {path}: {source}")]
    File { path: String, source: Box<DnaError> },
}

/// Identity of a vertex or an edge, stable across mutations.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Id(pub u64);

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a vertex applies to the sum of its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    Linear,
    BatchNormRelu,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vertex {
    pub id: Id,
    pub activation: Activation,
}

/// A convolution's mutable parameters. Integer parameters are stored as floats and rounded
/// where used (footnote 3), so that several small mutations can add up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Convolution {
    pub filter_height: f64,
    pub filter_width: f64,
    pub log2_stride: f64,
    pub channels: f64,
}

impl Convolution {
    /// The inserted convolution of INSERT-CONVOLUTION: 3x3, the given stride and channels.
    pub fn new(log2_stride: u32, channels: usize) -> Self {
        Self {
            filter_height: 3.0,
            filter_width: 3.0,
            log2_stride: f64::from(log2_stride),
            channels: channels as f64,
        }
    }

    pub fn filter_height(&self) -> usize {
        nearest_odd(self.filter_height)
    }

    pub fn filter_width(&self) -> usize {
        nearest_odd(self.filter_width)
    }

    pub fn stride(&self) -> usize {
        1usize << (self.log2_stride.round().clamp(0.0, MAX_LOG2_STRIDE) as u32)
    }

    pub fn out_channels(&self) -> usize {
        (self.channels.round() as usize).max(1)
    }
}

/// The odd integer nearest to `x`, at least 1: filters stay centred on their pixel.
fn nearest_odd(x: f64) -> usize {
    let k = ((x - 1.0) / 2.0).round().max(0.0);
    2 * (k as usize) + 1
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EdgeKind {
    Identity,
    Convolution(Convolution),
}

/// Whether an edge sets its vertex's shape (the backbone edge) or is resized to fit it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Skip,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    pub id: Id,
    pub from: Id,
    pub to: Id,
    pub role: Role,
    #[serde(flatten)]
    pub kind: EdgeKind,
}

impl Edge {
    pub fn convolution(&self) -> Option<&Convolution> {
        match &self.kind {
            EdgeKind::Convolution(c) => Some(c),
            EdgeKind::Identity => None,
        }
    }
}

/// Channels and spatial size of a rank-3 activation (one example, no batch dimension).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape3 {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl Shape3 {
    pub const CIFAR: Shape3 = Shape3 {
        channels: 3,
        height: 32,
        width: 32,
    };

    pub fn elements(&self) -> usize {
        self.channels * self.height * self.width
    }
}

impl fmt::Display for Shape3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}

/// What a network built from a DNA reads and predicts: the same DNA gives other shapes, costs
/// and weights for another input or class count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub input: Shape3,
    pub classes: usize,
}

impl ModelSpec {
    pub fn cifar(classes: usize) -> Self {
        Self {
            input: Shape3::CIFAR,
            classes,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dna {
    pub format_version: u32,
    pub learning_rate: f64,
    /// The backbone, input first; the last vertex feeds the softmax layer.
    pub vertices: Vec<Vertex>,
    pub edges: Vec<Edge>,
    /// The next unused id: ids are never reused, so inherited weights never land on a
    /// different layer that happens to get an old name.
    pub next_id: u64,
}

impl Dna {
    /// The initial individual of §3.3: the input flattened straight into the softmax layer.
    pub fn initial() -> Self {
        Dna {
            format_version: FORMAT_VERSION,
            learning_rate: INITIAL_LEARNING_RATE,
            vertices: vec![
                Vertex {
                    id: Id(0),
                    activation: Activation::Linear,
                },
                Vertex {
                    id: Id(1),
                    activation: Activation::Linear,
                },
            ],
            edges: vec![Edge {
                id: Id(2),
                from: Id(0),
                to: Id(1),
                role: Role::Primary,
                kind: EdgeKind::Identity,
            }],
            next_id: 3,
        }
    }

    pub fn from_json(json: &str) -> Result<Self, DnaError> {
        // Read the version first so that a future format fails with a version error rather
        // than a confusing missing-field error.
        #[derive(Deserialize)]
        struct Versioned {
            format_version: u32,
        }
        let versioned: Versioned = serde_json::from_str(json)?;
        if versioned.format_version != FORMAT_VERSION {
            return Err(DnaError::UnsupportedVersion {
                found: versioned.format_version,
            });
        }
        let dna: Dna = serde_json::from_str(json)?;
        dna.validate()?;
        Ok(dna)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a DNA always serialises")
    }

    pub fn load(path: &Path) -> Result<Self, DnaError> {
        let text = std::fs::read_to_string(path).map_err(|source| DnaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| DnaError::File {
            path: path.display().to_string(),
            source: Box::new(e),
        })
    }

    pub fn fresh_id(&mut self) -> Id {
        let id = Id(self.next_id);
        self.next_id += 1;
        id
    }

    pub fn input(&self) -> &Vertex {
        &self.vertices[0]
    }

    pub fn output(&self) -> &Vertex {
        self.vertices.last().expect("a valid DNA has vertices")
    }

    pub fn vertex_index(&self, id: Id) -> Option<usize> {
        self.vertices.iter().position(|v| v.id == id)
    }

    /// The primary edge entering the vertex at `index` (`index >= 1`).
    pub fn primary_edge_into(&self, index: usize) -> &Edge {
        let id = self.vertices[index].id;
        self.edges
            .iter()
            .find(|e| e.to == id && e.role == Role::Primary)
            .expect("a valid DNA has one primary edge per vertex")
    }

    pub fn skip_edges_into(&self, index: usize) -> impl Iterator<Item = &Edge> {
        let id = self.vertices[index].id;
        self.edges
            .iter()
            .filter(move |e| e.to == id && e.role == Role::Skip)
    }

    pub fn convolutions(&self) -> impl Iterator<Item = (&Edge, &Convolution)> {
        self.edges
            .iter()
            .filter_map(|e| e.convolution().map(|c| (e, c)))
    }

    pub fn convolution_count(&self) -> usize {
        self.convolutions().count()
    }

    pub fn skip_count(&self) -> usize {
        self.edges.iter().filter(|e| e.role == Role::Skip).count()
    }

    /// The activation shape of every vertex, in backbone order, for the given input.
    ///
    /// The primary edge alone decides a vertex's shape (§3.2); convolutions are padded
    /// "same", so a stride `s` maps a side of `n` pixels to `ceil(n / s)`.
    pub fn shapes(&self, input: Shape3) -> Vec<Shape3> {
        let mut shapes = Vec::with_capacity(self.vertices.len());
        shapes.push(input);
        for index in 1..self.vertices.len() {
            let edge = self.primary_edge_into(index);
            let from = self.vertex_index(edge.from).expect("valid DNA");
            let source = shapes[from];
            shapes.push(match &edge.kind {
                EdgeKind::Identity => source,
                EdgeKind::Convolution(c) => Shape3 {
                    channels: c.out_channels(),
                    height: source.height.div_ceil(c.stride()),
                    width: source.width.div_ceil(c.stride()),
                },
            });
        }
        shapes
    }

    /// Checks every invariant the rest of the system relies on. Mutations keep them; this is
    /// for DNA that comes from outside the process (files, the population store).
    pub fn validate(&self) -> Result<(), DnaError> {
        let invalid = |msg: String| Err(DnaError::Invalid(msg));
        if self.format_version != FORMAT_VERSION {
            return Err(DnaError::UnsupportedVersion {
                found: self.format_version,
            });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return invalid(format!(
                "learning_rate must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if self.vertices.len() < 2 {
            return invalid(format!(
                "need at least an input and an output vertex, got {} vertices",
                self.vertices.len()
            ));
        }
        let mut ids = HashSet::new();
        for id in self
            .vertices
            .iter()
            .map(|v| v.id)
            .chain(self.edges.iter().map(|e| e.id))
        {
            if !ids.insert(id) {
                return invalid(format!("id {id} is used twice"));
            }
            if id.0 >= self.next_id {
                return invalid(format!("id {id} is not below next_id {}", self.next_id));
            }
        }
        if self.input().activation != Activation::Linear {
            return invalid("the input vertex must have a linear activation".into());
        }
        let mut skips = HashSet::new();
        for edge in &self.edges {
            let (Some(from), Some(to)) = (self.vertex_index(edge.from), self.vertex_index(edge.to))
            else {
                return invalid(format!("edge {} joins an unknown vertex", edge.id));
            };
            match edge.role {
                Role::Primary if from + 1 != to => {
                    return invalid(format!(
                        "primary edge {} must join consecutive backbone vertices",
                        edge.id
                    ))
                }
                Role::Skip if from >= to => {
                    return invalid(format!("skip edge {} must point forward", edge.id))
                }
                Role::Skip if edge.kind != EdgeKind::Identity => {
                    return invalid(format!("skip edge {} must be an identity", edge.id))
                }
                Role::Skip if !skips.insert((from, to)) => {
                    return invalid(format!("skip edge {} duplicates another", edge.id))
                }
                _ => {}
            }
            if let EdgeKind::Convolution(c) = &edge.kind {
                let ok = |x: f64, min: f64| x.is_finite() && x >= min;
                if !(ok(c.filter_height, 1.0)
                    && ok(c.filter_width, 1.0)
                    && ok(c.channels, 1.0)
                    && ok(c.log2_stride, 0.0))
                {
                    return invalid(format!(
                        "convolution {} has out-of-range parameters {c:?}",
                        edge.id
                    ));
                }
            }
        }
        for index in 1..self.vertices.len() {
            let id = self.vertices[index].id;
            let primaries = self
                .edges
                .iter()
                .filter(|e| e.to == id && e.role == Role::Primary)
                .count();
            if primaries != 1 {
                return invalid(format!(
                    "vertex {id} has {primaries} primary edges, needs exactly one"
                ));
            }
        }
        Ok(())
    }

    /// A one-line picture of the backbone, e.g. `in -C3x3/2:64-> BN+R -I-> out`.
    pub fn summary(&self) -> String {
        let mut out = String::from("in");
        for index in 1..self.vertices.len() {
            let edge = self.primary_edge_into(index);
            match &edge.kind {
                EdgeKind::Identity => out.push_str(" -I->"),
                EdgeKind::Convolution(c) => out.push_str(&format!(
                    " -C{}x{}/{}:{}->",
                    c.filter_height(),
                    c.filter_width(),
                    c.stride(),
                    c.out_channels()
                )),
            }
            let skips = self.skip_edges_into(index).count();
            if skips > 0 {
                out.push_str(&format!(" (+{skips} skip)"));
            }
            out.push_str(match self.vertices[index].activation {
                Activation::Linear => " L",
                Activation::BatchNormRelu => " BN+R",
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_is_a_linear_model() {
        let dna = Dna::initial();
        dna.validate().unwrap();
        assert_eq!(dna.learning_rate, 0.1);
        assert_eq!(dna.convolution_count(), 0);
        assert_eq!(dna.shapes(Shape3::CIFAR).last(), Some(&Shape3::CIFAR));
    }

    #[test]
    fn json_round_trip_keeps_everything() {
        let mut dna = Dna::initial();
        dna.edges[0].kind = EdgeKind::Convolution(Convolution {
            filter_height: 4.2,
            filter_width: 1.1,
            log2_stride: 0.7,
            channels: 12.6,
        });
        let back = Dna::from_json(&dna.to_json()).unwrap();
        assert_eq!(back, dna);
    }

    #[test]
    fn integers_are_rounded_where_used() {
        let c = Convolution {
            filter_height: 4.2,
            filter_width: 1.9,
            log2_stride: 1.6,
            channels: 12.5,
        };
        assert_eq!(c.filter_height(), 5);
        assert_eq!(c.filter_width(), 1);
        assert_eq!(c.stride(), 4);
        assert_eq!(c.out_channels(), 13);
        assert_eq!(nearest_odd(4.01), 5);
        assert_eq!(nearest_odd(3.9), 3);
        assert_eq!(nearest_odd(1.0), 1);
    }

    #[test]
    fn strided_shapes_round_up() {
        let mut dna = Dna::initial();
        dna.edges[0].kind = EdgeKind::Convolution(Convolution::new(2, 7));
        let shapes = dna.shapes(Shape3 {
            channels: 3,
            height: 10,
            width: 9,
        });
        assert_eq!(
            shapes[1],
            Shape3 {
                channels: 7,
                height: 3,
                width: 3
            }
        );
    }

    #[test]
    fn unknown_version_is_named() {
        let json = Dna::initial()
            .to_json()
            .replace("\"format_version\": 1", "\"format_version\": 9");
        let err = Dna::from_json(&json).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn backward_skip_is_rejected() {
        let mut dna = Dna::initial();
        let id = dna.fresh_id();
        dna.edges.push(Edge {
            id,
            from: Id(1),
            to: Id(0),
            role: Role::Skip,
            kind: EdgeKind::Identity,
        });
        let err = dna.validate().unwrap_err();
        assert!(err.to_string().contains("point forward"), "{err}");
    }
}
