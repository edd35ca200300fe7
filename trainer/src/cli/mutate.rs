//! `trainer mutate PARENT.json`: a mutated child DNA, for inspection (§3.2).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use population::dna::Dna;
use population::mutation::{self, AppliedMutation, Mutation};
use population::seed::{self, Stream};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The parent DNA (JSON); `initial` for the paper's initial linear model.
    parent: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Number of mutations (the mutation rate).
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Apply this mutation instead of drawing one (e.g. FILTER-SIZE).
    #[arg(long)]
    mutation: Option<Mutation>,
    /// Output file (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let parent = if args.parent == "initial" {
        Dna::initial()
    } else {
        Dna::load(Path::new(&args.parent))?
    };
    let mut rng = seed::rng(args.seed, Stream::Mutation);
    let (dna, mutations) = match args.mutation {
        None => {
            let child = mutation::mutate(&parent, args.count, &mut rng);
            (child.dna, child.mutations)
        }
        Some(m) => {
            let mut dna = parent.clone();
            let mut applied = Vec::new();
            for _ in 0..args.count {
                let Some(detail) = m.apply(&mut dna, &mut rng) else {
                    bail!("{m} cannot apply to {}", args.parent);
                };
                applied.push(AppliedMutation {
                    mutation: m,
                    detail,
                });
            }
            (dna, applied)
        }
    };
    for m in &mutations {
        eprintln!("{}: {}", m.mutation, m.detail);
    }
    eprintln!("{}", dna.summary());
    match args.output {
        Some(path) => std::fs::write(&path, dna.to_json() + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{}", dna.to_json()),
    }
    Ok(())
}
