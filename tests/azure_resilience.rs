//! Throttling, retries, credentials and the limiter, against the emulator and in paused time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{sync::Arc, time::Duration};

use azure_core::{Url, auth::TokenCredential};
use rdphealth::{
    azure::{
        ARM_SCOPE, ArmClient, ArmConfig, Azure, AzureError, Limiter, LimiterConfig, StaticToken,
        VmRef, WorkloadIdentity, limiter::OpClass,
    },
    sim::{HttpFault, Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-0000000de000";

fn scenario() -> Scenario {
    let mut s = Scenario::from_file(std::path::Path::new("scenarios/demo.yaml")).unwrap();
    s.timing.operation = Duration::from_millis(50);
    s.timing.restart = Duration::from_millis(50);
    s.timing.retry_after = Duration::from_millis(20);
    s
}

fn client(sim: &Simulator, cred: Arc<dyn TokenCredential>) -> ArmClient {
    ArmClient::new(ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()), cred)
}

fn token() -> Arc<dyn TokenCredential> {
    Arc::new(StaticToken::new("test-token"))
}

fn vm(name: &str) -> VmRef {
    VmRef::new(SUB, "rg-rdp", name)
}

#[tokio::test]
async fn a_429_surfaces_retry_after_and_is_not_retried() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, token());
    sim.inject_http_fault(HttpFault {
        operation: "vm.get".into(),
        status: 429,
        retry_after: Some(1200),
        count: 5,
        code: None,
    });
    let err = az.vm_state(&vm("vm-healthy")).await.unwrap_err();
    match &err {
        AzureError::Throttled {
            status,
            retry_after,
            remaining,
        } => {
            assert_eq!(*status, 429);
            assert_eq!(*retry_after, Some(Duration::from_secs(1200)));
            assert!(remaining.subscription_reads.is_some());
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(err.reason(), "Throttled");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1200)));
    // One request, no retry storm, no 20-minute sleep.
    assert_eq!(sim.count("vm.get"), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_emulators_token_bucket_throttles_with_retry_after() {
    let mut s = scenario();
    s.throttle.reads.burst = 3;
    s.throttle.reads.per_second = 0.01;
    let sim = Simulator::start(s).await.unwrap();
    let az = client(&sim, token());
    for _ in 0..3 {
        az.resource_health(&vm("vm-healthy")).await.unwrap();
    }
    let err = az.resource_health(&vm("vm-healthy")).await.unwrap_err();
    let AzureError::Throttled {
        retry_after,
        remaining,
        ..
    } = err
    else {
        panic!("expected Throttled, got {err:?}");
    };
    assert!(retry_after.unwrap() >= Duration::from_secs(50));
    assert_eq!(remaining.subscription_reads, Some(0));
    assert_eq!(sim.count("throttled"), 1);
    assert_eq!(sim.count("health.get"), 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_post_that_gets_a_500_is_not_sent_again() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, token());
    sim.inject_http_fault(HttpFault {
        operation: "vm.restart".into(),
        status: 500,
        retry_after: None,
        count: 1,
        code: None,
    });
    let err = az.restart(&vm("vm-healthy")).await.unwrap_err();
    assert_eq!(err.reason(), "Transient");
    assert_eq!(
        sim.count("vm.restart"),
        1,
        "a restart must never be re-sent blindly"
    );
    assert_eq!(
        sim.vm("vm-healthy").unwrap().boot,
        0,
        "the VM was not restarted"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_get_that_gets_a_500_is_retried_a_bounded_number_of_times() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, token());
    sim.inject_http_fault(HttpFault {
        operation: "pip.get".into(),
        status: 500,
        retry_after: None,
        count: 1,
        code: None,
    });
    az.endpoint(&vm("vm-healthy")).await.unwrap();
    assert_eq!(sim.count("pip.get"), 2);
    sim.inject_http_fault(HttpFault {
        operation: "pip.get".into(),
        status: 502,
        retry_after: None,
        count: 10,
        code: None,
    });
    let err = az.endpoint(&vm("vm-healthy")).await.unwrap_err();
    assert_eq!(err.reason(), "Transient");
    assert_eq!(
        sim.count("pip.get"),
        2 + 3,
        "first attempt plus two retries"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_missing_bearer_token_is_unauthorized() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, Arc::new(StaticToken::new("")));
    let err = az.vm_state(&vm("vm-healthy")).await.unwrap_err();
    assert_eq!(err.reason(), "Unauthorized");
    assert_eq!(sim.count("unauthorized"), 1);
    sim.shutdown().await;
}

fn token_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("rdphealth-{name}-{}", std::process::id()))
}

#[tokio::test]
async fn workload_identity_rereads_the_projected_token_file() {
    let mut s = scenario();
    // Tokens shorter-lived than the refresh margin: every call exchanges again.
    s.timing.token_lifetime = Duration::from_secs(60);
    let sim = Simulator::start(s).await.unwrap();
    let file = token_file("rotate");
    std::fs::write(&file, "projected-token-one\n").unwrap();
    let cred = WorkloadIdentity::new(
        azure_core::new_http_client(),
        Url::parse(&sim.arm_url()).unwrap(),
        "tenant-id",
        "client-id",
        &file,
    );
    cred.get_token(&[ARM_SCOPE]).await.unwrap();
    std::fs::write(&file, "projected-token-two\n").unwrap();
    let cred: Arc<dyn TokenCredential> = Arc::new(cred);
    // The whole path: token exchange, then ARM with the bearer token.
    let az = client(&sim, cred.clone());
    az.vm_state(&vm("vm-healthy")).await.unwrap();
    let log = sim.token_log();
    assert_eq!(log.count, 2);
    assert_ne!(
        log.credential_fingerprints[0], log.credential_fingerprints[1],
        "the rotated file was read"
    );
    assert!(!format!("{cred:?}").contains("projected-token"));
    std::fs::remove_file(&file).unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn workload_identity_caches_tokens_per_scope() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let file = token_file("cache");
    std::fs::write(&file, "projected-token").unwrap();
    let cred = WorkloadIdentity::new(
        azure_core::new_http_client(),
        Url::parse(&sim.arm_url()).unwrap(),
        "tenant-id",
        "client-id",
        &file,
    );
    let a = cred.get_token(&[ARM_SCOPE]).await.unwrap();
    let b = cred.get_token(&[ARM_SCOPE]).await.unwrap();
    assert_eq!(a.token.secret(), b.token.secret());
    assert_eq!(sim.token_log().count, 1);
    cred.get_token(&["https://storage.azure.com/.default"])
        .await
        .unwrap();
    assert_eq!(sim.token_log().count, 2);
    std::fs::remove_file(&file).unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn the_adapter_waits_for_its_own_bucket_before_calling_arm() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let mut cfg = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    cfg.limiter.reads = rdphealth::azure::limiter::BucketShape {
        burst: 2.0,
        per_second: 0.001,
    };
    let az = ArmClient::new(cfg, token());
    az.resource_health(&vm("vm-healthy")).await.unwrap();
    az.resource_health(&vm("vm-healthy")).await.unwrap();
    let third = tokio::time::timeout(
        Duration::from_millis(300),
        az.resource_health(&vm("vm-healthy")),
    )
    .await;
    assert!(third.is_err(), "the third read waits for a token");
    assert_eq!(
        sim.count("health.get"),
        2,
        "the waiting read never reached ARM"
    );
    sim.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_limiter_keeps_a_burst_of_1000_reads_under_the_bucket_rate() {
    let limiter = Arc::new(Limiter::new(LimiterConfig::default()));
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let l = limiter.clone();
        tasks.spawn(async move {
            let _permit = l.acquire("sub-a", OpClass::Read).await;
            start.elapsed()
        });
    }
    let mut times = Vec::new();
    while let Some(t) = tasks.join_next().await {
        times.push(t.unwrap());
    }
    times.sort();
    // By any moment t, at most burst + rate·t reads were let through.
    for (i, t) in times.iter().enumerate() {
        let allowed = 250.0 + 25.0 * t.as_secs_f64() + 1e-6;
        assert!(
            (i + 1) as f64 <= allowed.ceil(),
            "read {} at {t:?} exceeds the bucket",
            i + 1
        );
    }
    assert!(
        times[999] >= Duration::from_secs(30),
        "750 reads beyond the burst need 30 s at 25/s"
    );
    // Another subscription has its own bucket.
    let t0 = tokio::time::Instant::now();
    let _p = limiter.acquire("sub-b", OpClass::Read).await;
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn the_limiter_caps_concurrent_writes() {
    let limiter = Limiter::new(LimiterConfig {
        max_concurrent_writes: 2,
        ..LimiterConfig::default()
    });
    let a = limiter.acquire("s", OpClass::Write).await;
    let _b = limiter.acquire("s", OpClass::Write).await;
    let third =
        tokio::time::timeout(Duration::from_secs(5), limiter.acquire("s", OpClass::Write)).await;
    assert!(third.is_err(), "a third write must wait for a slot");
    drop(a);
    let third =
        tokio::time::timeout(Duration::from_secs(5), limiter.acquire("s", OpClass::Write)).await;
    assert!(third.is_ok());
}

/// Compute throttles with 429 `OperationNotAllowed` (detail `TooManyRequests`) and Retry-After
/// up to 20 minutes: it is throttling, not a conflict, and the wait is carried as sent; the
/// throttled write reports the writes budget, not the reads one.
#[tokio::test]
async fn computes_throttling_shape_is_throttling_with_its_long_retry_after() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, token());
    sim.inject_http_fault(HttpFault {
        operation: "vm.restart".into(),
        status: 429,
        retry_after: Some(1200),
        count: 1,
        code: Some("OperationNotAllowed".into()),
    });
    let err = az.restart(&vm("vm-healthy")).await.unwrap_err();
    match &err {
        AzureError::Throttled {
            status,
            retry_after,
            remaining,
        } => {
            assert_eq!(*status, 429);
            assert_eq!(*retry_after, Some(Duration::from_secs(1200)));
            assert!(remaining.subscription_writes.is_some());
            assert!(remaining.subscription_reads.is_none());
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    assert_eq!(
        sim.count("vm.restart"),
        1,
        "a throttled write is not re-sent"
    );
    sim.shutdown().await;
}

/// Network's answer to a concurrent change is a lock, not throttling: a conflict the caller
/// waits out, with the Retry-After Azure sent.
#[tokio::test]
async fn networks_retryable_conflict_is_a_conflict_with_its_wait() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let az = client(&sim, token());
    sim.inject_http_fault(HttpFault {
        operation: "nic.get".into(),
        status: 429,
        retry_after: Some(10),
        count: 1,
        code: Some("RetryableErrorDueToAnotherOperation".into()),
    });
    let err = az.endpoint(&vm("vm-healthy")).await.unwrap_err();
    assert!(
        matches!(&err, AzureError::Conflict { code, .. } if code == "RetryableErrorDueToAnotherOperation"),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(10)));
    sim.shutdown().await;
}

/// The emulator issues JWT-shaped tokens with `exp` and refuses them once expired (401
/// `ExpiredAuthenticationToken`). A token that expires while a restart runs is refreshed by
/// the credential; the operation is polled to its end and the restart is sent once.
#[tokio::test]
async fn a_token_expiring_mid_operation_is_refreshed_and_polled_to_the_end() {
    let mut s = scenario();
    s.timing.token_lifetime = Duration::from_secs(2);
    s.timing.restart = Duration::from_secs(5);
    s.timing.retry_after = Duration::from_millis(200);
    let sim = Simulator::start(s).await.unwrap();
    let file = token_file("expiry");
    std::fs::write(&file, "projected-token").unwrap();
    let cred = WorkloadIdentity::new(
        azure_core::new_http_client(),
        Url::parse(&sim.arm_url()).unwrap(),
        "tenant-id",
        "client-id",
        &file,
    )
    .with_refresh_margin(Duration::from_secs(1));
    let first = cred.get_token(&[ARM_SCOPE]).await.unwrap();
    let jwt: Vec<&str> = first.token.secret().split('.').collect();
    assert_eq!(jwt.len(), 3, "a JWT: header, claims, signature");
    let stale = client(&sim, Arc::new(StaticToken::new(first.token.secret())));
    let az = client(&sim, Arc::new(cred));
    let op = az.restart(&vm("vm-hung")).await.unwrap();
    let started = std::time::Instant::now();
    let outcome = loop {
        match az.poll(&op).await.unwrap() {
            rdphealth::azure::PollOutcome::Pending { .. } => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => break other,
        }
    };
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "it outlived a token"
    );
    assert!(
        matches!(outcome, rdphealth::azure::PollOutcome::Succeeded { .. }),
        "{outcome:?}"
    );
    assert!(sim.token_log().count >= 3, "{:?}", sim.token_log());
    assert_eq!(sim.count("vm.restart"), 1, "the write was sent once");
    assert_eq!(sim.token_log().expired_rejections, 0, "refreshed in time");
    // The first token is past its `exp` by now: refused, and said so.
    let err = stale.vm_state(&vm("vm-healthy")).await.unwrap_err();
    assert_eq!(err.reason(), "Unauthorized", "{err:?}");
    assert_eq!(sim.token_log().expired_rejections, 1);
    std::fs::remove_file(&file).unwrap();
    sim.shutdown().await;
}
