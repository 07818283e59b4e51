//! Leader election: only the Lease holder writes status and acts.

use super::*;

/// Whether this replica holds the lease. Every replica probes; only the leader will act
/// once remediation exists.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Leadership without election (one replica): always the leader.
    pub fn always() -> Self {
        let (_, rx) = watch::channel(true);
        Self(rx)
    }

    /// Leadership that follows `rx`.
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// True while this replica holds the lease.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }
}

/// Lease settings for leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

pub(super) async fn elect(
    client: &Client,
    lease: &LeaseSettings,
) -> Result<(Leadership, Option<LeaseTask>), RunError> {
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .build()
        .await
        .map_err(RunError::Lease)?;
    let (rx, task) = manager.watch().await;
    let mut changes = rx.clone();
    let identity = lease.identity.clone();
    let logger = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let leader = *changes.borrow_and_update();
            info!(identity = %identity, leader, "leadership changed");
        }
    });
    Ok((
        Leadership::from_receiver(rx),
        Some(LeaseTask { task, logger }),
    ))
}

/// The running lease manager and the task logging leadership changes.
pub(super) struct LeaseTask {
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    logger: tokio::task::JoinHandle<()>,
}

impl LeaseTask {
    /// Releases the lease: the manager does so once every leadership receiver is gone.
    pub(super) async fn release(self) {
        self.logger.abort();
        let _ = self.logger.await;
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "failed to release the lease"),
            Err(_) => warn!("timed out releasing the lease"),
            _ => info!("lease released"),
        }
    }
}
