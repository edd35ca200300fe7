//! The chain of ancestors an individual descends from, from an initial (linear) individual to
//! it: each step with the mutations that made it from its parent, its validation accuracy and
//! its birth time since the experiment began. As text (one line per generation) and as SVG.

use std::collections::HashMap;
use std::fmt::Write as _;

use population::individual::Individual;

use super::Svg;

/// Ancestors first, `individual` last. Where a parent's record is missing (unreadable, or
/// never written by a worker that crashed), the chain begins at the first record found, and
/// `missing` names the parent not found.
pub struct Lineage<'a> {
    pub chain: Vec<&'a Individual>,
    pub missing: Option<String>,
}

impl<'a> Lineage<'a> {
    pub fn of(individual: &'a Individual, all: &'a [Individual]) -> Self {
        let by_id: HashMap<String, &Individual> =
            all.iter().map(|i| (i.id.to_string(), i)).collect();
        let mut chain = vec![individual];
        let mut missing = None;
        let mut current = individual;
        while let Some(parent) = &current.lineage.parent {
            // A cycle cannot happen (ids grow with time), but a corrupt record must not hang.
            if chain.len() > all.len() {
                break;
            }
            match by_id.get(&parent.to_string()) {
                Some(p) => {
                    chain.push(p);
                    current = p;
                }
                None => {
                    missing = Some(parent.to_string());
                    break;
                }
            }
        }
        chain.reverse();
        Self { chain, missing }
    }

    /// What made each step from its parent, in words.
    fn changes(individual: &Individual) -> Vec<String> {
        if individual.lineage.parent.is_none() {
            return vec!["initial individual".into()];
        }
        if individual.lineage.retrained {
            return vec!["retrained from fresh weights (weight reset)".into()];
        }
        individual
            .lineage
            .mutations
            .iter()
            .map(|m| {
                if m.detail.is_empty() {
                    m.mutation.to_string()
                } else {
                    format!("{}: {}", m.mutation, m.detail)
                }
            })
            .collect()
    }

    /// One line per generation: generation, birth time, validation accuracy, id, changes.
    pub fn text(&self, created_at_ms: u64) -> String {
        let mut out = String::new();
        if let Some(missing) = &self.missing {
            let _ = writeln!(
                out,
                "(the record of ancestor {missing} is missing; the chain begins after it)"
            );
        }
        let _ = writeln!(
            out,
            "{:>4}  {:>8}  {:>10}  {:<22}  changes from its parent",
            "gen", "born", "validation", "individual"
        );
        for (generation, i) in self.chain.iter().enumerate() {
            let _ = writeln!(
                out,
                "{generation:>4}  {:>8}  {:>9.2}%  {:<22}  {}",
                clock(i.born_at_ms.saturating_sub(created_at_ms)),
                100.0 * i.fitness(),
                i.id.to_string(),
                Self::changes(i).join("; ")
            );
        }
        out
    }

    /// The chain top to bottom: a box per generation, the changes between boxes.
    pub fn svg(&self, title: &str, created_at_ms: u64) -> String {
        const X: f64 = 40.0;
        const W: f64 = 420.0;
        const H: f64 = 30.0;
        const LINE: f64 = 14.0;
        let mut svg = Svg::new();
        svg.text(X, 26.0, 17.0, "start", r#"font-weight="bold""#, title);
        let mut y = 44.0;
        if let Some(missing) = &self.missing {
            let note =
                format!("the record of ancestor {missing} is missing: the chain begins after it");
            svg.text(X, y + 4.0, 12.0, "start", r##"fill="#a00""##, &note);
            y += 18.0;
        }
        let mut widest: f64 = X + W;
        for (generation, i) in self.chain.iter().enumerate() {
            if generation > 0 {
                let changes = Self::changes(i);
                let gap = 16.0 + LINE * changes.len() as f64;
                svg.arrow(X + 24.0, y, X + 24.0, y + gap);
                for (k, change) in changes.iter().enumerate() {
                    svg.text(
                        X + 34.0,
                        y + 14.0 + LINE * k as f64,
                        11.5,
                        "start",
                        r##"fill="#222""##,
                        change,
                    );
                    widest = widest.max(X + 34.0 + 6.5 * change.chars().count() as f64);
                }
                y += gap;
            }
            let fill = if generation + 1 == self.chain.len() {
                "#fdebd0"
            } else if i.lineage.parent.is_none() {
                "#e8e8e8"
            } else {
                "#d6e9f8"
            };
            svg.rect(X, y, W, H, fill);
            let label = format!(
                "gen {generation} · born {} · validation {:.2}% · {}",
                clock(i.born_at_ms.saturating_sub(created_at_ms)),
                100.0 * i.fitness(),
                short(&i.id.to_string())
            );
            svg.text(X + 10.0, y + 19.5, 12.5, "start", "", &label);
            y += H;
        }
        svg.finish(widest + 30.0, y + 24.0, &[])
    }
}

/// Milliseconds as `12m05s` (or `1h02m` past an hour).
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// An id's time part and the start of its random part: enough to tell generations apart.
fn short(id: &str) -> String {
    match id.split_once('-') {
        Some((time, random)) => format!("{time}-{}", &random[..random.len().min(4)]),
        None => id.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_read_as_minutes_and_hours() {
        assert_eq!(clock(65_400), "1m05s");
        assert_eq!(clock(3_725_000), "1h02m");
        assert_eq!(short("1a234386c8e-9f28a45c"), "1a234386c8e-9f28");
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use population::fixtures;
    use population::individual::IndividualId;
    use population::mutation::{AppliedMutation, Mutation};

    fn born(id: &str, parent: Option<&str>, at_ms: u64, fitness: f64) -> Individual {
        let mut i = fixtures::individual(fitness);
        i.id = IndividualId::parse(id).unwrap();
        i.lineage.parent = parent.map(|p| IndividualId::parse(p).unwrap());
        i.born_at_ms = at_ms;
        i.lineage.mutations = parent
            .map(|_| {
                vec![AppliedMutation {
                    mutation: Mutation::InsertConvolution,
                    detail: "conv 3x3 at vertex 2".into(),
                }]
            })
            .unwrap_or_default();
        i
    }

    #[test]
    fn the_chain_runs_from_the_initial_individual_and_names_a_missing_one() {
        let all = vec![
            born("1a000000000-00000001", None, 1_000, 0.1),
            born(
                "1a000000001-00000002",
                Some("1a000000000-00000001"),
                61_000,
                0.2,
            ),
            born(
                "1a000000002-00000003",
                Some("1a000000001-00000002"),
                122_000,
                0.3,
            ),
            born(
                "1a000000003-00000004",
                Some("1a0000000ff-000000ff"),
                130_000,
                0.05,
            ),
        ];
        let lineage = Lineage::of(&all[2], &all);
        assert_eq!(lineage.chain.len(), 3);
        assert!(lineage.missing.is_none());
        let text = lineage.text(1_000);
        assert!(text.contains("initial individual"), "{text}");
        assert!(
            text.contains("INSERT-CONVOLUTION: conv 3x3 at vertex 2"),
            "{text}"
        );
        assert!(text.contains("2m01s"), "{text}");
        let svg = lineage.svg("lineage", 1_000);
        assert_eq!(svg.matches("<rect").count(), 1 + 3);
        let orphan = Lineage::of(&all[3], &all);
        assert_eq!(orphan.chain.len(), 1);
        assert_eq!(orphan.missing.as_deref(), Some("1a0000000ff-000000ff"));
        assert!(orphan.text(0).contains("is missing"));
    }
}
