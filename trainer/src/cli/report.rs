//! `trainer report STORE` and `trainer evaluate STORE`: what any store holds, at any time.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use trainer::report;
use trainer::store::Population;

pub struct ReportTarget {
    pub out: PathBuf,
    /// The data folder, for the test accuracy; without it the test set is not touched.
    pub data: Option<PathBuf>,
    pub device: Device,
}

/// Summary on standard output; best individual exported and progress plot drawn into `out`.
pub async fn write_report(population: &Population, target: ReportTarget) -> Result<()> {
    let gathered = report::gather(population).await?;
    if gathered.individuals.is_empty() {
        println!("{} holds no trained individual yet", population.url());
        return Ok(());
    }
    let test = match &target.data {
        Some(dir) => {
            match report::evaluate_best(population, &gathered, dir, &target.device).await {
                Ok(result) => Some(result),
                Err(e) => {
                    eprintln!("test accuracy not measured: {e}");
                    None
                }
            }
        }
        None => None,
    };
    print!("{}", report::summary_text(&gathered, test.as_ref()));
    std::fs::create_dir_all(&target.out)?;
    let plot = target.out.join("progress.svg");
    report::plot(&gathered, &plot)?;
    match report::export_best(
        population,
        &gathered,
        test.as_ref(),
        &target.out.join("best"),
    )
    .await
    {
        Ok(dir) => println!("exported     {}", dir.display()),
        Err(e) => eprintln!("best individual not exported: {e}"),
    }
    println!("plot         {}", plot.display());
    Ok(())
}

/// The final evaluation Job's work: test accuracy of the best individual by validation.
pub async fn evaluate(population: &Population, data: PathBuf, device: Device) -> Result<()> {
    let gathered = report::gather(population).await?;
    let result = report::evaluate_best(population, &gathered, &data, &device).await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
