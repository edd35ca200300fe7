//! `trainer study STUDY.yaml`: runs every arm of a study over its seeds, several runs at once
//! within a core budget, then measures and aggregates them (trainer::study). A run whose store
//! already holds a finished experiment is not run again, so an interrupted study resumes and
//! `--aggregate` redraws the figures from the stores alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use trainer::study::{self, PlannedRun, StudyFile};

use super::flags::{DataFlag, DeviceFlag, S3Flags};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The study (YAML): a base manifest, arms, seeds; see examples/study/.
    study: PathBuf,
    #[command(flatten)]
    data: DataFlag,
    /// Where the runs, the table and the figures go (default: cambrian-study/<name>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Cores the study may use in all (default: all of this machine's).
    #[arg(long)]
    cores: Option<usize>,
    /// Runs at once; each gets cores / parallel threads.
    #[arg(long, default_value_t = 1)]
    parallel: usize,
    /// Only measure and aggregate the runs' stores; run nothing.
    #[arg(long)]
    aggregate: bool,
    #[command(flatten)]
    s3: S3Flags,
    /// The device of the test measurements; default the CPU.
    #[command(flatten)]
    device: DeviceFlag,
}

pub async fn run(args: Args) -> Result<()> {
    let file = StudyFile::load(&args.study)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("cambrian-study").join(&file.name));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize()?;
    let runs = file.plan(&args.study, &out)?;
    let data = match args.data.data.clone() {
        Some(dir) => dir,
        None => {
            let manifest = runs
                .iter()
                .find_map(|r| r.manifest.clone())
                .context("no arm to run and no --data folder for the test set")?;
            let text = serde_json::to_string(&manifest)?;
            let experiment = crds::manifest::parse("study", &text)?;
            trainer::data::source::folder(&experiment.spec, None).await?
        }
    };
    if !args.aggregate {
        let cores = args
            .cores
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let parallel = args.parallel.clamp(1, cores.max(1));
        let threads = (cores / parallel).max(1);
        let pending: Vec<&PlannedRun> = runs.iter().filter(|r| r.manifest.is_some()).collect();
        tracing::info!(study = %file.name, runs = pending.len(), parallel, threads, "running the study");
        run_all(&pending, &data, parallel, threads)?;
    }
    let device = args.device.open("cpu")?;
    let mut results = Vec::new();
    for run in &runs {
        let population = args.s3.open(&run.store).await?;
        let result = study::measure(&population, run, &data, &device)
            .await
            .with_context(|| format!("measuring {} seed {} ({})", run.arm, run.seed, run.store))?;
        tracing::info!(arm = %run.arm, seed = run.seed, individuals = result.individuals,
            test = result.last().and_then(|b| b.test).unwrap_or(f64::NAN), "measured");
        results.push(result);
    }
    let table = study::write_outputs(&file, &results, &out)?;
    println!("{table}");
    println!("table, figures and measurements in {}", out.display());
    Ok(())
}

/// Runs `runs` as `trainer run` processes, `parallel` at a time with `threads` threads each;
/// each one's output goes to `log.txt` in its folder.
fn run_all(runs: &[&PlannedRun], data: &Path, parallel: usize, threads: usize) -> Result<()> {
    let exe = std::env::current_exe().context("finding this trainer binary")?;
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(run) = runs.get(i) else { return };
                if let Err(e) = run_one(&exe, run, data, threads) {
                    failures
                        .lock()
                        .expect("no panics while held")
                        .push(format!("{} seed {}: {e:#}", run.arm, run.seed));
                }
            });
        }
    });
    let failures = failures.into_inner().expect("no panics while held");
    if !failures.is_empty() {
        bail!(
            "{} runs failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

fn run_one(exe: &Path, run: &PlannedRun, data: &Path, threads: usize) -> Result<()> {
    std::fs::create_dir_all(&run.folder)?;
    let manifest = run.folder.join("manifest.yaml");
    let text = serde_norway::to_string(run.manifest.as_ref().expect("a run to run"))?;
    std::fs::write(&manifest, text)?;
    let log_path = run.folder.join("log.txt");
    let log = std::fs::File::create(&log_path)?;
    tracing::info!(arm = %run.arm, seed = run.seed, log = %log_path.display(), "run started");
    let status = Command::new(exe)
        .arg("run")
        .arg(&manifest)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(run.folder.join("report"))
        .env("RAYON_NUM_THREADS", threads.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("starting {}", exe.display()))?;
    if !status.success() {
        bail!(
            "trainer run ended with {status}; see {}",
            log_path.display()
        );
    }
    Ok(())
}
