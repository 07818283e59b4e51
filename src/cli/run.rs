//! `rdphealth run`: the operator. Every flag can also be set from the environment.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use kube::Client;
use tokio::net::TcpListener;

use crate::{
    azure::{
        ArmClient, ArmConfig, Azure, AzureError, CountedAzure, Federation, ResourceGraph,
        credential,
    },
    controller::{self, LeaseSettings, RunError, Seams, Settings},
    engine::{AzureResolver, EndpointResolver, HostOverride, ResolverPolicy},
    evidence::exposure::{self, ExposureLimit},
    ladder::fleet::FleetPolicy,
    probe::{RdpProber, Target},
    tenancy::{TenancyError, TenancyPolicy},
};

/// Arguments of `rdphealth run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "RDPHEALTH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Objects reconciled (probed) at the same time; more that are due wait their turn, the
    /// one that fell due first going first.
    #[arg(long, env = "RDPHEALTH_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Watch RdpHealthFleet objects (needs Azure credentials: discovery uses Resource Graph).
    #[arg(long, env = "RDPHEALTH_FLEETS", default_value_t = true, action = clap::ArgAction::Set)]
    pub fleets: bool,
    /// Probes of one RdpHealthFleet's members in flight at once.
    #[arg(long, env = "RDPHEALTH_FLEET_PROBE_CONCURRENCY", default_value_t = 256, value_parser = clap::value_parser!(u16).range(1..))]
    pub fleet_probe_concurrency: u16,
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints.
    #[arg(long, env = "RDPHEALTH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Elect a leader through a coordination.k8s.io Lease (needed with more than one replica).
    #[arg(long, env = "RDPHEALTH_LEADER_ELECTION", default_value_t = false)]
    pub leader_election: bool,
    /// Shards across replicas: `auto` (16 shards) or a number (1 to 256). Each replica holds
    /// a fair share of the shards through one Lease per shard (`<lease-name>-shard-<n>`) and
    /// probes, writes status and remediates only the objects of its shards (an object's shard:
    /// FNV-1a 64 of its UID finalized with MurmurHash3's fmix64, modulo the number of shards). Implies Lease-based coordination
    /// (`--leader-election` need not be given). Unset: one Lease, one leader.
    #[arg(long, env = "RDPHEALTH_SHARDS", value_parser = parse_shards)]
    pub shards: Option<u32>,
    /// Name of the Lease (with `--shards`, the prefix of the shards' Leases).
    #[arg(
        long,
        env = "RDPHEALTH_LEASE_NAME",
        default_value = "rdphealth-operator"
    )]
    pub lease_name: String,
    /// Namespace of the Lease (usually the operator's own namespace).
    #[arg(long, env = "RDPHEALTH_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "RDPHEALTH_LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// This replica's identity in the Lease and in Events (default: the host name, i.e. the pod name).
    #[arg(long, env = "RDPHEALTH_IDENTITY")]
    pub identity: Option<String>,
    /// Azure Resource Manager endpoint (the simulator's URL for local runs). Azure is used
    /// when credentials are found: workload identity, a client secret, the Azure CLI, or
    /// `RDPHEALTH_AZURE_STATIC_TOKEN` for the simulator.
    #[arg(
        long,
        env = "RDPHEALTH_AZURE_ENDPOINT",
        default_value = "https://management.azure.com"
    )]
    pub azure_endpoint: azure_core::Url,
    /// The prober's egress address as Azure sees it, for evaluating NSG rules (default: the
    /// rules are evaluated for "any internet address").
    #[arg(long, env = "RDPHEALTH_PROBE_SOURCE_ADDRESS")]
    pub probe_source_address: Option<IpAddr>,
    /// Storm breaker: above this percentage of unreachable VMs in a subscription, disruptive
    /// rungs are suspended there.
    #[arg(long, env = "RDPHEALTH_MAX_UNREACHABLE_PERCENT", default_value_t = 30, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub max_unreachable_percent: u8,
    /// Storm breaker: only subscriptions with at least this many monitored VMs.
    #[arg(long, env = "RDPHEALTH_MIN_FLEET_SIZE", default_value_t = 5)]
    pub min_fleet_size: usize,
    /// Disruptive rungs in flight at once per subscription.
    #[arg(long, env = "RDPHEALTH_MAX_CONCURRENT_DISRUPTIVE", default_value_t = 1)]
    pub max_concurrent_disruptive: usize,
    /// Disruptive rungs wait this long after an incident opens, so that a fleet-wide outage
    /// trips the storm breaker before any VM is rebooted.
    #[arg(long, env = "RDPHEALTH_DISRUPTIVE_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub disruptive_grace: std::time::Duration,
    /// Fleet-wide breaker: above this percentage of all monitored VMs (every subscription
    /// together) turning unreachable within `--fleet-window`, every mutating rung is held.
    #[arg(long, env = "RDPHEALTH_FLEET_MAX_FAILING_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fleet_max_failing_percent: u8,
    /// Fleet-wide breaker: only with at least this many monitored VMs.
    #[arg(long, env = "RDPHEALTH_FLEET_MIN_SIZE", default_value_t = 4)]
    pub fleet_min_size: usize,
    /// Fleet-wide breaker: how recently a VM must have turned unreachable to count.
    #[arg(long, env = "RDPHEALTH_FLEET_WINDOW", default_value = "10m", value_parser = humantime::parse_duration)]
    pub fleet_window: std::time::Duration,
    /// An endpoint (`HOST:PORT`) that should always accept TCP connections; while the prober
    /// cannot connect to it, every mutating rung is held (the prober may be blind).
    #[arg(long, env = "RDPHEALTH_CANARY")]
    pub canary: Option<Target>,
    /// The most public address space `nsgRepair.allowedSourcePrefixes` may cover together,
    /// as an IPv4 prefix length (16 allows a /16; only stricter values, up to 32).
    #[arg(long, env = "RDPHEALTH_MAX_PUBLIC_SOURCE_V4_PREFIX", default_value_t = 16, value_parser = clap::value_parser!(u8).range(16..=32))]
    pub max_public_source_v4_prefix: u8,
    /// The same for IPv6 (32 allows a /32; only stricter values, up to 128).
    #[arg(long, env = "RDPHEALTH_MAX_PUBLIC_SOURCE_V6_PREFIX", default_value_t = 32, value_parser = clap::value_parser!(u8).range(32..=128))]
    pub max_public_source_v6_prefix: u8,
    /// A YAML file saying which Azure scopes (subscriptions, resource groups) each namespace,
    /// by name or by label selector, may name, and optionally the workload identity
    /// (`azureClientId`) every ARM request for it uses; an object outside its scopes is
    /// `Valid=False` and causes no Azure call. Unset: every namespace may name every VM the
    /// operator's identity reaches.
    #[arg(long, env = "RDPHEALTH_TENANCY_POLICY")]
    pub tenancy_policy: Option<std::path::PathBuf>,
    /// A healthy, unchanged object's status (and so `lastProbe`) is rewritten this often;
    /// `0s` never rewrites it (status changes only with news).
    #[arg(long, env = "RDPHEALTH_STATUS_HEARTBEAT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub status_heartbeat: std::time::Duration,
}

/// `--shards`: `auto` or a number of shards.
fn parse_shards(value: &str) -> Result<u32, String> {
    if value.trim().eq_ignore_ascii_case("auto") {
        return Ok(controller::AUTO_SHARDS);
    }
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=controller::MAX_SHARDS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected `auto` or a number of shards from 1 to {}",
            controller::MAX_SHARDS
        )),
    }
}

/// Errors of `rdphealth run`.
#[derive(Debug, thiserror::Error)]
pub enum RunCommandError {
    /// No usable Kubernetes configuration.
    #[error("failed to create a Kubernetes client")]
    Client(#[source] kube::Error),
    /// The metrics address could not be bound.
    #[error("failed to listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS configuration of the prober could not be built.
    #[error("failed to set up the prober")]
    Prober(#[source] rustls::Error),
    /// The operator stopped with an error.
    #[error("operator failed")]
    Run(#[source] RunError),
    /// The Azure adapter could not be set up.
    #[error("failed to set up Azure")]
    Azure(#[source] AzureError),
    /// The tenancy policy could not be loaded.
    #[error("failed to load the tenancy policy")]
    Tenancy(#[source] TenancyError),
}

impl RunCommandError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Client(_) => "ClientFailed",
            Self::Listen { .. } => "ListenFailed",
            Self::Prober(_) => "ProberSetupFailed",
            Self::Run(e) => e.reason(),
            Self::Azure(e) => e.reason(),
            Self::Tenancy(e) => e.reason(),
        }
    }
}

impl RunArgs {
    /// The controller settings these arguments describe.
    pub fn settings(&self) -> Settings {
        let identity = self
            .identity
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "rdphealth-operator".into());
        Settings {
            namespace: self.namespace.clone(),
            concurrency: self.concurrency,
            shards: self.shards,
            fleet_probe_concurrency: usize::from(self.fleet_probe_concurrency),
            lease: (self.leader_election || self.shards.is_some()).then(|| LeaseSettings {
                name: self.lease_name.clone(),
                namespace: self.lease_namespace.clone(),
                identity: identity.clone(),
                duration_seconds: self.lease_duration_seconds.max(2),
                grace_seconds: (self.lease_duration_seconds / 3).max(1),
            }),
            instance: Some(identity),
            fleet: FleetPolicy {
                max_unreachable_percent: self.max_unreachable_percent,
                min_fleet_size: self.min_fleet_size,
                max_concurrent_disruptive: self.max_concurrent_disruptive,
                disruptive_grace: self.disruptive_grace,
                fleet_max_failing_percent: self.fleet_max_failing_percent,
                fleet_min_size: self.fleet_min_size,
                fleet_window: self.fleet_window,
            },
            canary: self.canary.clone(),
            // Loaded from `--tenancy-policy` by `run` (reading a file can fail).
            tenancy: None,
            probe_source: self.probe_source_address,
            // `0s` on the command line: never rewrite an unchanged status.
            status_heartbeat: if self.status_heartbeat.is_zero() {
                std::time::Duration::MAX
            } else {
                self.status_heartbeat
            },
        }
    }

    /// The Azure adapter, when credentials are configured, and Resource Graph for fleets
    /// (`--fleets`), counted with the adapter's calls.
    pub fn azure(&self) -> Result<AzureSeams, RunCommandError> {
        let Some(credential) = credential::configured().map_err(RunCommandError::Azure)? else {
            tracing::warn!(
                "no Azure credentials found: observe-only (objects need spec.endpoint.host; no evidence, no remediation, no fleets)"
            );
            return Ok((None, None));
        };
        let config = ArmConfig::new(self.azure_endpoint.clone());
        let arm = Arc::new(ArmClient::new(config, credential));
        let counted = CountedAzure::new(arm.clone()).map_err(|e| {
            RunCommandError::Azure(AzureError::Invalid {
                message: e.to_string(),
            })
        })?;
        let graph = self
            .fleets
            .then(|| Arc::new(counted.graph(arm)) as Arc<dyn ResourceGraph>);
        tracing::info!(endpoint = %self.azure_endpoint, fleets = self.fleets, "Azure configured: endpoint resolution, evidence and remediation");
        Ok((Some(Arc::new(counted)), graph))
    }
}

/// The Azure adapter and Resource Graph, when configured.
pub type AzureSeams = (Option<Arc<CountedAzure>>, Option<Arc<dyn ResourceGraph>>);

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(args: &RunArgs) -> Result<(), RunCommandError> {
    let client = Client::try_default()
        .await
        .map_err(RunCommandError::Client)?;
    let listener = TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunCommandError::Listen {
            addr: args.metrics_addr,
            source,
        })?;
    let (azure, graph) = args.azure()?;
    let resolver: Arc<dyn EndpointResolver> = match &azure {
        Some(azure) => Arc::new(AzureResolver::new(
            azure.clone() as Arc<dyn Azure>,
            ResolverPolicy::default(),
        )),
        None => Arc::new(HostOverride),
    };
    exposure::configure(ExposureLimit {
        v4_prefix: args.max_public_source_v4_prefix,
        v6_prefix: args.max_public_source_v6_prefix,
    });
    // The identities the tenancy policy names for namespaces, from the same federated token.
    let identities = match &azure {
        Some(_) => Some(Arc::new(
            Federation::from_env(ArmConfig::new(args.azure_endpoint.clone()))
                .map_err(RunCommandError::Azure)?,
        )),
        None => None,
    };
    let seams = Seams {
        prober: Arc::new(RdpProber::new().map_err(RunCommandError::Prober)?),
        resolver,
        azure,
        identities,
        graph,
    };
    tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
    let mut settings = args.settings();
    settings.tenancy = match &args.tenancy_policy {
        Some(path) => Some(TenancyPolicy::load(path).map_err(RunCommandError::Tenancy)?),
        None => None,
    };
    controller::run(client, settings, seams, listener, shutdown_signal())
        .await
        .map_err(RunCommandError::Run)
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_auto_or_a_bounded_number() {
        assert_eq!(parse_shards("auto"), Ok(controller::AUTO_SHARDS));
        assert_eq!(parse_shards("AUTO"), Ok(controller::AUTO_SHARDS));
        assert_eq!(parse_shards("16"), Ok(16));
        assert_eq!(parse_shards("1"), Ok(1));
        for bad in ["0", "257", "-1", "many", ""] {
            assert!(parse_shards(bad).is_err(), "{bad}");
        }
    }
}
