//! The eleven mutations of §3.2. A reproduction copies the parent's DNA and applies
//! `mutation_rate` of them, each drawn uniformly; one that cannot apply (no skip to remove) is
//! redrawn.
//!
//! Numerical values are resampled uniformly between half and twice their current value, with
//! no upper bound; strides are resampled on their log2, so they stay powers of two.

use std::fmt;
use std::str::FromStr;

use rand::seq::IndexedRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::dna::{Activation, Convolution, Dna, Edge, EdgeKind, Id, Role, Vertex};

/// Channels of the images every DNA starts from (CIFAR-10 and CIFAR-100 are RGB).
pub const IMAGE_CHANNELS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING-KEBAB-CASE")]
pub enum Mutation {
    AlterLearningRate,
    Identity,
    ResetWeights,
    InsertConvolution,
    RemoveConvolution,
    AlterStride,
    AlterNumberOfChannels,
    FilterSize,
    InsertOneToOne,
    AddSkip,
    RemoveSkip,
}

impl Mutation {
    pub const ALL: [Mutation; 11] = [
        Mutation::AlterLearningRate,
        Mutation::Identity,
        Mutation::ResetWeights,
        Mutation::InsertConvolution,
        Mutation::RemoveConvolution,
        Mutation::AlterStride,
        Mutation::AlterNumberOfChannels,
        Mutation::FilterSize,
        Mutation::InsertOneToOne,
        Mutation::AddSkip,
        Mutation::RemoveSkip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::AlterLearningRate => "ALTER-LEARNING-RATE",
            Mutation::Identity => "IDENTITY",
            Mutation::ResetWeights => "RESET-WEIGHTS",
            Mutation::InsertConvolution => "INSERT-CONVOLUTION",
            Mutation::RemoveConvolution => "REMOVE-CONVOLUTION",
            Mutation::AlterStride => "ALTER-STRIDE",
            Mutation::AlterNumberOfChannels => "ALTER-NUMBER-OF-CHANNELS",
            Mutation::FilterSize => "FILTER-SIZE",
            Mutation::InsertOneToOne => "INSERT-ONE-TO-ONE",
            Mutation::AddSkip => "ADD-SKIP",
            Mutation::RemoveSkip => "REMOVE-SKIP",
        }
    }

    /// Applies this mutation to `dna` and describes what it did, or returns `None` and leaves
    /// `dna` untouched when it cannot apply.
    pub fn apply(self, dna: &mut Dna, rng: &mut impl Rng) -> Option<String> {
        match self {
            Mutation::AlterLearningRate => {
                let before = dna.learning_rate;
                dna.learning_rate = around(rng, before);
                Some(format!(
                    "learning rate {before:.4} -> {:.4}",
                    dna.learning_rate
                ))
            }
            Mutation::Identity => Some("keep training".into()),
            Mutation::ResetWeights => Some("all weights reinitialised".into()),
            Mutation::InsertConvolution => Some(insert_vertex(dna, rng, true)),
            Mutation::InsertOneToOne => Some(insert_vertex(dna, rng, false)),
            Mutation::RemoveConvolution => remove_convolution(dna, rng),
            Mutation::AlterStride => alter_convolution(dna, rng, |c, rng| {
                // Uniform over [s/2, 2s] on the log2 scale, clipped to strides of at least 1.
                let before = c.log2_stride;
                c.log2_stride = rng.random_range((before - 1.0).max(0.0)..=before + 1.0);
                format!("log2 stride {before:.3} -> {:.3}", c.log2_stride)
            }),
            Mutation::AlterNumberOfChannels => alter_convolution(dna, rng, |c, rng| {
                let before = c.channels;
                c.channels = around(rng, before).max(1.0);
                format!("channels {before:.2} -> {:.2}", c.channels)
            }),
            Mutation::FilterSize => alter_convolution(dna, rng, |c, rng| {
                let (name, size) = if rng.random_bool(0.5) {
                    ("height", &mut c.filter_height)
                } else {
                    ("width", &mut c.filter_width)
                };
                let before = *size;
                *size = around(rng, before).max(1.0);
                format!("filter {name} {before:.2} -> {:.2}", *size)
            }),
            Mutation::AddSkip => add_skip(dna, rng),
            Mutation::RemoveSkip => {
                let skips: Vec<Id> = dna
                    .edges
                    .iter()
                    .filter(|e| e.role == Role::Skip)
                    .map(|e| e.id)
                    .collect();
                let id = *skips.choose(rng)?;
                dna.edges.retain(|e| e.id != id);
                Some(format!("removed skip {id}"))
            }
        }
    }
}

impl fmt::Display for Mutation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Mutation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('_', "-");
        Mutation::ALL
            .into_iter()
            .find(|m| m.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown mutation {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One mutation as it was applied to a child, kept in its lineage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedMutation {
    pub mutation: Mutation,
    pub detail: String,
}

/// A parent's DNA after mutation, with what was done to it.
#[derive(Clone, Debug)]
pub struct Child {
    pub dna: Dna,
    pub mutations: Vec<AppliedMutation>,
}

impl Child {
    /// RESET-WEIGHTS anywhere in the sequence means the child inherits nothing.
    pub fn inherits_weights(&self) -> bool {
        !self
            .mutations
            .iter()
            .any(|m| m.mutation == Mutation::ResetWeights)
    }
}

/// Copies `parent` and applies `count` mutations, each drawn uniformly from all eleven.
pub fn mutate(parent: &Dna, count: usize, rng: &mut impl Rng) -> Child {
    let mut dna = parent.clone();
    let mut mutations = Vec::with_capacity(count);
    while mutations.len() < count {
        let mutation = *Mutation::ALL.choose(rng).expect("eleven mutations");
        if let Some(detail) = mutation.apply(&mut dna, rng) {
            mutations.push(AppliedMutation { mutation, detail });
        }
    }
    debug_assert!(dna.validate().is_ok());
    Child { dna, mutations }
}

/// Uniform between half and twice `x`, every value in the range possible.
fn around(rng: &mut impl Rng, x: f64) -> f64 {
    rng.random_range(x / 2.0..=x * 2.0)
}

fn random_activation(rng: &mut impl Rng) -> Activation {
    if rng.random_bool(0.5) {
        Activation::BatchNormRelu
    } else {
        Activation::Linear
    }
}

/// Output channels of every backbone vertex, in order.
fn channels(dna: &Dna) -> Vec<usize> {
    let mut out = vec![IMAGE_CHANNELS];
    for index in 1..dna.vertices.len() {
        let edge = dna.primary_edge_into(index);
        out.push(match &edge.kind {
            EdgeKind::Identity => out[index - 1],
            EdgeKind::Convolution(c) => c.out_channels(),
        });
    }
    out
}

/// INSERT-CONVOLUTION and INSERT-ONE-TO-ONE: a new vertex `x` with a random activation goes
/// into the backbone before a random vertex `w`, fed by the new edge from `w`'s predecessor
/// `u`; `w`'s old primary edge now leaves `x`. The new convolution keeps `u`'s channels, so
/// at stride 1 every existing tensor keeps its shape and its inherited weights.
fn insert_vertex(dna: &mut Dna, rng: &mut impl Rng, convolution: bool) -> String {
    let index = rng.random_range(1..dna.vertices.len());
    let u = dna.vertices[index - 1].id;
    let w = dna.vertices[index].id;
    let kind = if convolution {
        let log2_stride = rng.random_range(0..=1);
        EdgeKind::Convolution(Convolution::new(log2_stride, channels(dna)[index - 1]))
    } else {
        EdgeKind::Identity
    };
    let activation = random_activation(rng);
    let x = dna.fresh_id();
    let edge = dna.fresh_id();
    for e in dna.edges.iter_mut() {
        if e.to == w && e.role == Role::Primary {
            e.from = x;
        }
    }
    let description = match &kind {
        EdgeKind::Convolution(c) => format!(
            "conv {edge} 3x3 stride {} {} channels into new {activation:?} vertex {x} before vertex {w}",
            c.stride(),
            c.out_channels()
        ),
        EdgeKind::Identity => {
            format!("identity {edge} into new {activation:?} vertex {x} before vertex {w}")
        }
    };
    dna.edges.push(Edge {
        id: edge,
        from: u,
        to: x,
        role: Role::Primary,
        kind,
    });
    dna.vertices.insert(index, Vertex { id: x, activation });
    description
}

/// REMOVE-CONVOLUTION: the convolution `u -> x` goes, and `x` merges into `u`; edges that
/// touched `x` now touch `u`. This exactly undoes INSERT-CONVOLUTION.
fn remove_convolution(dna: &mut Dna, rng: &mut impl Rng) -> Option<String> {
    let convs: Vec<Id> = dna.convolutions().map(|(e, _)| e.id).collect();
    let id = *convs.choose(rng)?;
    let edge = dna.edges.iter().find(|e| e.id == id).cloned()?;
    let (u, x) = (edge.from, edge.to);
    dna.edges.retain(|e| e.id != id);
    dna.vertices.retain(|v| v.id != x);
    for e in dna.edges.iter_mut() {
        if e.from == x {
            e.from = u;
        }
        if e.to == x {
            e.to = u;
        }
    }
    // A skip that ran parallel to the removed convolution would now be a loop; a skip that
    // now duplicates another adds nothing.
    let mut seen = std::collections::HashSet::new();
    dna.edges
        .retain(|e| e.role == Role::Primary || (e.from != e.to && seen.insert((e.from, e.to))));
    Some(format!("removed conv {id}, merged vertex {x} into {u}"))
}

/// Applies `change` to a convolution chosen uniformly, if there is one.
fn alter_convolution<R: Rng>(
    dna: &mut Dna,
    rng: &mut R,
    change: impl FnOnce(&mut Convolution, &mut R) -> String,
) -> Option<String> {
    let convs: Vec<Id> = dna.convolutions().map(|(e, _)| e.id).collect();
    let id = *convs.choose(rng)?;
    let edge = dna.edges.iter_mut().find(|e| e.id == id)?;
    let EdgeKind::Convolution(c) = &mut edge.kind else {
        return None;
    };
    Some(format!("conv {id}: {}", change(c, rng)))
}

/// ADD-SKIP: an identity between two backbone vertices, from the earlier to the later, that
/// neither duplicates an existing skip nor an identity primary edge.
fn add_skip(dna: &mut Dna, rng: &mut impl Rng) -> Option<String> {
    let n = dna.vertices.len();
    let mut candidates = Vec::new();
    for to in 1..n {
        let primary_is_identity = dna.primary_edge_into(to).kind == EdgeKind::Identity;
        let existing: Vec<usize> = dna
            .skip_edges_into(to)
            .filter_map(|e| dna.vertex_index(e.from))
            .collect();
        for from in 0..to {
            let duplicates_primary = from + 1 == to && primary_is_identity;
            if !duplicates_primary && !existing.contains(&from) {
                candidates.push((from, to));
            }
        }
    }
    let &(from, to) = candidates.choose(rng)?;
    let (from, to) = (dna.vertices[from].id, dna.vertices[to].id);
    let id = dna.fresh_id();
    dna.edges.push(Edge {
        id,
        from,
        to,
        role: Role::Skip,
        kind: EdgeKind::Identity,
    });
    Some(format!("skip {id} from vertex {from} to vertex {to}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dna::Shape3;
    use crate::seed::{rng, Stream};

    /// input -conv-> a -identity-> b, plus one skip from the input.
    fn two_layer() -> Dna {
        let mut dna = Dna::initial();
        let mut r = rng(1, Stream::Mutation);
        Mutation::InsertConvolution.apply(&mut dna, &mut r).unwrap();
        Mutation::AddSkip.apply(&mut dna, &mut r).unwrap();
        dna
    }

    fn apply(m: Mutation, dna: &Dna, seed: u64) -> Option<Dna> {
        let mut child = dna.clone();
        m.apply(&mut child, &mut rng(seed, Stream::Mutation))?;
        child.validate().unwrap();
        Some(child)
    }

    fn only_conv(dna: &Dna) -> &Convolution {
        let mut convs = dna.convolutions();
        let (_, c) = convs.next().expect("one convolution");
        assert!(convs.next().is_none());
        c
    }

    #[test]
    fn alter_learning_rate_stays_within_half_and_double() {
        for seed in 0..200 {
            let child = apply(Mutation::AlterLearningRate, &Dna::initial(), seed).unwrap();
            assert!((0.05..=0.2).contains(&child.learning_rate));
            assert_eq!(child.edges, Dna::initial().edges);
        }
    }

    #[test]
    fn identity_and_reset_leave_the_dna_alone() {
        let dna = two_layer();
        assert_eq!(apply(Mutation::Identity, &dna, 0).unwrap(), dna);
        assert_eq!(apply(Mutation::ResetWeights, &dna, 0).unwrap(), dna);
    }

    #[test]
    fn insert_convolution_adds_3x3_with_input_channels() {
        let mut seen_strides = std::collections::HashSet::new();
        let mut seen_activations = std::collections::HashSet::new();
        for seed in 0..40 {
            let dna = Dna::initial();
            let child = apply(Mutation::InsertConvolution, &dna, seed).unwrap();
            assert_eq!(child.vertices.len(), 3);
            let c = only_conv(&child);
            assert_eq!((c.filter_height(), c.filter_width()), (3, 3));
            assert_eq!(c.out_channels(), IMAGE_CHANNELS);
            seen_strides.insert(c.stride());
            seen_activations.insert(format!("{:?}", child.vertices[1].activation));
        }
        assert_eq!(seen_strides.len(), 2, "strides 1 and 2 both drawn");
        assert_eq!(seen_activations.len(), 2, "BN+ReLU and linear both drawn");
    }

    #[test]
    fn remove_convolution_undoes_insert() {
        let dna = Dna::initial();
        let inserted = apply(Mutation::InsertConvolution, &dna, 3).unwrap();
        let removed = apply(Mutation::RemoveConvolution, &inserted, 3).unwrap();
        assert_eq!(removed.vertices, dna.vertices);
        assert_eq!(removed.edges, dna.edges);
        assert!(apply(Mutation::RemoveConvolution, &dna, 0).is_none());
    }

    #[test]
    fn remove_convolution_reattaches_skips() {
        // in -conv-> a -I-> b with skip in -> b; then removing conv merges a into in.
        let dna = two_layer();
        let removed = apply(Mutation::RemoveConvolution, &dna, 0).unwrap();
        assert_eq!(removed.convolution_count(), 0);
        assert_eq!(removed.vertices.len(), 2);
    }

    #[test]
    fn alter_stride_keeps_powers_of_two() {
        let dna = apply(Mutation::InsertConvolution, &Dna::initial(), 0).unwrap();
        let mut strides = std::collections::HashSet::new();
        let mut current = dna.clone();
        for seed in 0..100 {
            current = apply(Mutation::AlterStride, &current, seed).unwrap();
            let c = only_conv(&current);
            assert!(c.stride().is_power_of_two());
            assert!(c.log2_stride >= 0.0);
            strides.insert(c.stride());
        }
        assert!(strides.len() >= 3, "strides explored: {strides:?}");
        assert!(apply(Mutation::AlterStride, &Dna::initial(), 0).is_none());
    }

    #[test]
    fn alter_channels_stays_within_half_and_double() {
        let mut dna = apply(Mutation::InsertConvolution, &Dna::initial(), 0).unwrap();
        for e in dna.edges.iter_mut() {
            if let EdgeKind::Convolution(c) = &mut e.kind {
                c.channels = 10.0;
            }
        }
        let mut values = Vec::new();
        for seed in 0..200 {
            let child = apply(Mutation::AlterNumberOfChannels, &dna, seed).unwrap();
            let c = only_conv(&child);
            assert!((5.0..=20.0).contains(&c.channels));
            values.push(c.out_channels());
        }
        assert!(values.iter().any(|&v| v < 10) && values.iter().any(|&v| v > 10));
    }

    #[test]
    fn filter_size_changes_one_dimension_to_odd_values() {
        let dna = apply(Mutation::InsertConvolution, &Dna::initial(), 0).unwrap();
        let mut heights = 0;
        let mut widths = 0;
        for seed in 0..100 {
            let child = apply(Mutation::FilterSize, &dna, seed).unwrap();
            let c = only_conv(&child);
            assert!(c.filter_height() % 2 == 1 && c.filter_width() % 2 == 1);
            match (c.filter_height != 3.0, c.filter_width != 3.0) {
                (true, false) => heights += 1,
                (false, true) => widths += 1,
                other => panic!("exactly one dimension changes, got {other:?}"),
            }
            assert!((1.5..=6.0).contains(&c.filter_height.max(c.filter_width)));
        }
        assert!(heights > 20 && widths > 20);
    }

    #[test]
    fn insert_one_to_one_adds_an_identity_vertex() {
        let dna = two_layer();
        let child = apply(Mutation::InsertOneToOne, &dna, 5).unwrap();
        assert_eq!(child.vertices.len(), dna.vertices.len() + 1);
        assert_eq!(child.convolution_count(), dna.convolution_count());
        assert_eq!(child.edges.len(), dna.edges.len() + 1);
        assert_eq!(
            child.shapes(Shape3::CIFAR).last(),
            dna.shapes(Shape3::CIFAR).last()
        );
    }

    #[test]
    fn add_skip_and_remove_skip() {
        // The initial DNA has a single identity edge: there is nowhere new to skip.
        assert!(apply(Mutation::AddSkip, &Dna::initial(), 0).is_none());
        assert!(apply(Mutation::RemoveSkip, &Dna::initial(), 0).is_none());
        let dna = apply(Mutation::InsertConvolution, &Dna::initial(), 0).unwrap();
        let with = apply(Mutation::AddSkip, &dna, 0).unwrap();
        assert_eq!(with.skip_count(), 1);
        let without = apply(Mutation::RemoveSkip, &with, 0).unwrap();
        assert_eq!((without.vertices, without.edges), (dna.vertices, dna.edges));
    }

    #[test]
    fn mutate_redraws_until_it_applies_and_repeats_by_seed() {
        let a = mutate(&Dna::initial(), 5, &mut rng(42, Stream::Mutation));
        let b = mutate(&Dna::initial(), 5, &mut rng(42, Stream::Mutation));
        assert_eq!(a.mutations.len(), 5);
        assert_eq!(a.dna, b.dna);
        assert_eq!(a.mutations, b.mutations);
    }

    #[test]
    fn names_parse_back() {
        for m in Mutation::ALL {
            assert_eq!(m.name().parse::<Mutation>().unwrap(), m);
        }
        assert!("filter_size".parse::<Mutation>().is_ok());
        assert!("grow".parse::<Mutation>().is_err());
    }
}
