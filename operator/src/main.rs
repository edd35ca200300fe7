//! The operator binary: wires the Kubernetes client, leader election, the HTTP endpoints and
//! the controller together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use clap::Parser;
use kube::api::{Api, ListParams};
use kube::Client;
use operator::controller::{self, Context, StorePolicy};
use operator::jobs::JobSettings;
use operator::metrics::Metrics;
use operator::server::{self, Health};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "operator",
    version,
    about = "Kubernetes operator for EvolutionExperiments"
)]
struct Args {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "CAMBRIAN_HTTP_ADDRESS", default_value = "0.0.0.0:8080")]
    http: SocketAddr,
    /// Trainer image for experiments that name none.
    #[arg(
        long,
        env = "CAMBRIAN_TRAINER_IMAGE",
        default_value = "ghcr.io/cambrian-dev/trainer:latest"
    )]
    trainer_image: String,
    /// GPUs each trainer pod asks for when its experiment sets no resources.
    #[arg(long, env = "CAMBRIAN_DEFAULT_GPUS", default_value_t = 0)]
    default_gpus: u32,
    /// Elect a leader through a Lease, so that only one of several replicas reconciles.
    #[arg(long, env = "CAMBRIAN_LEADER_ELECTION", default_value_t = false)]
    leader_election: bool,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", default_value = "cambrian-operator")]
    identity: String,
    /// Accept `file://` stores: only where every pod mounts the same folder (one node).
    #[arg(long, env = "CAMBRIAN_ALLOW_FILE_STORES", default_value_t = false)]
    allow_file_stores: bool,
    /// Accept S3 stores without a credentials Secret, reached with the pods' own identity.
    #[arg(long, env = "CAMBRIAN_AMBIENT_CREDENTIALS", default_value_t = false)]
    ambient_credentials: bool,
    /// Failed workers Jobs replaced before an experiment is marked Failed.
    #[arg(long, env = "CAMBRIAN_MAX_WORKER_RESTARTS", default_value_t = 3)]
    max_worker_restarts: u32,
    /// Seconds between status refreshes of a running experiment from its store.
    #[arg(long, env = "CAMBRIAN_REFRESH_SECONDS", default_value_t = 30)]
    refresh_seconds: u64,
    /// Log as JSON lines.
    #[arg(long, env = "CAMBRIAN_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    // kube and the AWS SDK both enable a rustls crypto provider; with two, rustls picks none.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (in-cluster service account or KUBECONFIG)")?;
    let experiments = Api::<crds::EvolutionExperiment>::all(client.clone());
    experiments
        .list(&ListParams::default().limit(1))
        .await
        .context("cannot list EvolutionExperiments: is the CRD installed? (helm install, or `cargo run -p operator --bin crdgen | kubectl apply -f -`)")?;

    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let http = args.http;
    tokio::spawn(async move {
        if let Err(e) = server::serve(http, health).await {
            tracing::error!(error = %e, address = %http, "HTTP server failed");
            std::process::exit(1);
        }
    });

    let mut ctx = Context::new(
        client.clone(),
        metrics,
        JobSettings {
            trainer_image: args.trainer_image,
            default_gpus: args.default_gpus,
            ..JobSettings::default()
        },
    );
    ctx.stores = StorePolicy {
        allow_file_stores: args.allow_file_stores,
        ambient_credentials: args.ambient_credentials,
    };
    ctx.max_worker_restarts = args.max_worker_restarts;
    ctx.refresh = std::time::Duration::from_secs(args.refresh_seconds.max(1));
    let ctx = Arc::new(ctx);

    if !args.leader_election {
        ready.store(true, Ordering::Relaxed);
        controller::run(ctx).await;
        return Ok(());
    }

    let manager = kube_lease_manager::LeaseManagerBuilder::new(client, "cambrian-operator")
        .with_namespace(&args.namespace)
        .with_identity(&args.identity)
        .with_field_manager(operator::MANAGER)
        .build()
        .await
        .context("leader election")?;
    let (mut leader, _task) = manager.watch().await;
    // A standby replica is ready: it serves metrics and health, and takes over when needed.
    ready.store(true, Ordering::Relaxed);
    while !*leader.borrow_and_update() {
        tracing::info!(identity = %args.identity, "waiting to lead");
        leader.changed().await.context("leader election ended")?;
    }
    tracing::info!(identity = %args.identity, "leading");
    tokio::select! {
        () = controller::run(ctx) => Ok(()),
        lost = async {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow() {
                    break;
                }
            }
        } => {
            let () = lost;
            // Another replica leads now; exit so that two never reconcile at once.
            tracing::error!("lost the leader lease; exiting");
            std::process::exit(1)
        }
    }
}
