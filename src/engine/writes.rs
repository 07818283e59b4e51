//! When a driver that pays for every write (the Kubernetes controller: each status write is an
//! API request, an etcd write and a watch event to every watcher) must write a new status.
//!
//! Some status fields change with every probe of a healthy, unchanged VM: the time and latency
//! of the last probe, the count of successes in a row, the history of recent probe results. A
//! change to those alone is not news to anyone, so it is not written; they are written along
//! with the next change a user cares about, and at least every [`HEARTBEAT`] so that
//! `status.lastProbe.time` never looks older than that (plus one probe interval) while the
//! operator keeps probing. Every probe is still counted in the metrics.

use std::{
    hash::{DefaultHasher, Hasher},
    time::Duration,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{LastProbe, RdpHealthStatus};

/// How often a status whose only changes are per-probe facts is written anyway: the longest
/// `status.lastProbe.time` lags behind the last probe (plus at most one probe interval).
pub const HEARTBEAT: Duration = Duration::from_secs(10 * 60);

/// Whether `a` and `b` tell a user the same thing: they differ at most in the facts that change
/// with every probe (`lastProbe.time`, `lastProbe.latencyMs`, `consecutiveSuccesses`,
/// `recentProbes`).
///
/// `recentProbes` gains a `0` only with a failed probe, which always changes
/// `consecutiveFailures` too, so a failure is never left unwritten; only runs of successes
/// wait for the next write.
pub fn same_for_users(a: &RdpHealthStatus, b: &RdpHealthStatus) -> bool {
    // Destructured so that a new status field cannot be added without deciding here whether
    // changing it is news.
    let RdpHealthStatus {
        observed_generation,
        phase,
        conditions,
        last_probe,
        consecutive_failures,
        consecutive_successes: _,
        last_transition_to_unreachable,
        endpoint,
        recent_probes: _,
        diagnosis,
        ladder,
        identity,
        observed_by,
    } = a;
    *observed_generation == b.observed_generation
        && *phase == b.phase
        && *conditions == b.conditions
        && same_probe(last_probe.as_ref(), b.last_probe.as_ref())
        && *consecutive_failures == b.consecutive_failures
        && *last_transition_to_unreachable == b.last_transition_to_unreachable
        && *endpoint == b.endpoint
        && *diagnosis == b.diagnosis
        && *ladder == b.ladder
        // Includes observedAt: the identity step's cadence is kept in status.
        && *identity == b.identity
        // A shard's new holder says so at once.
        && *observed_by == b.observed_by
}

fn same_probe(a: Option<&LastProbe>, b: Option<&LastProbe>) -> bool {
    let (Some(a), Some(b)) = (a, b) else {
        return a.is_none() && b.is_none();
    };
    let LastProbe {
        time: _,
        reachable,
        failure_reason,
        message,
        latency_ms: _,
        selected_protocol,
        tls_version,
        certificate_not_after,
    } = a;
    *reachable == b.reachable
        && *failure_reason == b.failure_reason
        && *message == b.message
        && *selected_protocol == b.selected_protocol
        && *tls_version == b.tls_version
        && *certificate_not_after == b.certificate_not_after
}

/// A hash of what [`same_for_users`] compares: equal statuses (for users) have equal
/// fingerprints. Lets a driver remember a status in a few bytes.
pub fn fingerprint(status: &RdpHealthStatus) -> u64 {
    let RdpHealthStatus {
        observed_generation,
        phase,
        conditions,
        last_probe,
        consecutive_failures,
        consecutive_successes: _,
        last_transition_to_unreachable,
        endpoint,
        recent_probes: _,
        diagnosis,
        ladder,
        identity,
        observed_by,
    } = status;
    let probe = last_probe.as_ref().map(|p| {
        let LastProbe {
            time: _,
            reachable,
            failure_reason,
            message,
            latency_ms: _,
            selected_protocol,
            tls_version,
            certificate_not_after,
        } = p;
        (
            reachable,
            failure_reason,
            message,
            selected_protocol,
            tls_version,
            certificate_not_after,
        )
    });
    let mut hasher = HashWriter(DefaultHasher::new());
    // Serializing these types cannot fail (no maps with non-string keys); the hash of
    // whatever was written before a failure would still be deterministic.
    let _ = serde_json::to_writer(
        &mut hasher,
        &(
            observed_generation,
            phase,
            conditions,
            probe,
            consecutive_failures,
            last_transition_to_unreachable,
            endpoint,
            diagnosis,
            ladder,
            identity,
            observed_by,
        ),
    );
    hasher.0.finish()
}

struct HashWriter(DefaultHasher);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The facts of a status that [`same_for_users`] ignores: what a driver keeps in memory when it
/// does not write them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerProbe {
    time: Option<MicroTime>,
    latency_ms: Option<u64>,
    consecutive_successes: u32,
    recent_probes: String,
}

impl PerProbe {
    /// The per-probe facts of `status`.
    pub fn of(status: &RdpHealthStatus) -> Self {
        Self {
            time: status.last_probe.as_ref().map(|p| p.time.clone()),
            latency_ms: status.last_probe.as_ref().map(|p| p.latency_ms),
            consecutive_successes: status.consecutive_successes,
            recent_probes: status.recent_probes.clone(),
        }
    }

    /// Puts these facts into `status` (a status that tells the same story).
    pub fn apply(&self, status: &mut RdpHealthStatus) {
        if let (Some(probe), Some(time), Some(latency_ms)) =
            (status.last_probe.as_mut(), &self.time, self.latency_ms)
        {
            probe.time = time.clone();
            probe.latency_ms = latency_ms;
        }
        status.consecutive_successes = self.consecutive_successes;
        status.recent_probes.clone_from(&self.recent_probes);
    }
}

/// Whether `new` must be written over `stored` (the status as the API server has it): when
/// there is none yet, when it tells a user something new, or when the last probe it records is
/// at least `heartbeat` newer than the stored one. A zero `heartbeat` writes every new probe.
pub fn needs_write(
    stored: Option<&RdpHealthStatus>,
    new: &RdpHealthStatus,
    heartbeat: Duration,
) -> bool {
    let Some(stored) = stored else {
        return true;
    };
    if !same_for_users(stored, new) {
        return true;
    }
    let (Some(before), Some(after)) = (&stored.last_probe, &new.last_probe) else {
        return false;
    };
    match Duration::try_from(after.time.0.duration_since(before.time.0)) {
        Ok(newer) => !newer.is_zero() && newer >= heartbeat,
        // The stored probe is the newer one (another replica wrote it).
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
    use rstest::rstest;

    use super::*;
    use crate::{
        api::{EndpointSource, Phase, ResolvedEndpoint},
        engine::testing::at,
        evidence::Evidence,
        ladder::{Rung, Step},
    };

    /// A healthy status as the engine writes it, last probed at unix second `probed`.
    fn healthy(probed: i64) -> RdpHealthStatus {
        RdpHealthStatus {
            observed_generation: Some(1),
            phase: Some(Phase::Healthy),
            conditions: vec![Condition {
                type_: "Reachable".into(),
                status: "True".into(),
                reason: "Reachable".into(),
                message: "10.0.0.4:3389 answers RDP (hybrid)".into(),
                observed_generation: Some(1),
                last_transition_time: Time(at(0)),
            }],
            last_probe: Some(LastProbe {
                time: MicroTime(at(probed)),
                reachable: true,
                failure_reason: None,
                message: None,
                latency_ms: 4,
                selected_protocol: Some("hybrid".into()),
                tls_version: Some("TLSv1.3".into()),
                certificate_not_after: Some(Time(at(1_000_000))),
            }),
            consecutive_failures: 0,
            consecutive_successes: 7,
            observed_by: None,
            last_transition_to_unreachable: None,
            endpoint: Some(ResolvedEndpoint {
                host: "10.0.0.4".into(),
                port: 3389,
                source: EndpointSource::Spec,
                computer_name: None,
            }),
            recent_probes: "1111111".into(),
            diagnosis: None,
            ladder: Default::default(),
            identity: None,
        }
    }

    fn probe(s: &mut RdpHealthStatus) -> &mut LastProbe {
        s.last_probe.as_mut().unwrap()
    }

    fn evidence() -> Evidence {
        Evidence::empty(at(120))
    }

    const HB: Duration = HEARTBEAT;

    /// The next probe of an object last written at second 100, `edit`ed.
    #[rstest]
    #[case::nothing_changed(|_: &mut RdpHealthStatus| {}, false, false)]
    #[case::only_the_time(|s: &mut RdpHealthStatus| probe(s).time = MicroTime(at(130)), false, false)]
    #[case::only_the_latency(|s: &mut RdpHealthStatus| probe(s).latency_ms = 250, false, false)]
    #[case::one_more_success(|s: &mut RdpHealthStatus| s.consecutive_successes += 1, false, false)]
    #[case::longer_history(|s: &mut RdpHealthStatus| s.recent_probes.push('1'), false, false)]
    #[case::every_per_probe_fact(|s: &mut RdpHealthStatus| {
        probe(s).time = MicroTime(at(130));
        probe(s).latency_ms = 9;
        s.consecutive_successes += 1;
        s.recent_probes.push('1');
    }, false, false)]
    #[case::heartbeat_due(|s: &mut RdpHealthStatus| probe(s).time = MicroTime(at(100 + HB.as_secs() as i64)), false, true)]
    #[case::heartbeat_almost_due(|s: &mut RdpHealthStatus| probe(s).time = MicroTime(at(99 + HB.as_secs() as i64)), false, false)]
    #[case::a_failed_probe(|s: &mut RdpHealthStatus| {
        s.consecutive_failures = 1;
        s.consecutive_successes = 0;
        s.recent_probes.push('0');
        probe(s).reachable = false;
        probe(s).failure_reason = Some("tcp_refused".into());
    }, true, true)]
    #[case::failures_in_a_row(|s: &mut RdpHealthStatus| s.consecutive_failures = 2, true, true)]
    #[case::failure_detail(|s: &mut RdpHealthStatus| probe(s).message = Some("connect refused".into()), true, true)]
    #[case::condition_message(|s: &mut RdpHealthStatus| s.conditions[0].message = "1 of 2 probes".into(), true, true)]
    #[case::condition_status(|s: &mut RdpHealthStatus| s.conditions[0].status = "False".into(), true, true)]
    #[case::phase(|s: &mut RdpHealthStatus| s.phase = Some(Phase::Degraded), true, true)]
    #[case::spec_generation(|s: &mut RdpHealthStatus| s.observed_generation = Some(2), true, true)]
    #[case::protocol(|s: &mut RdpHealthStatus| probe(s).selected_protocol = Some("ssl".into()), true, true)]
    #[case::tls_version(|s: &mut RdpHealthStatus| probe(s).tls_version = Some("TLSv1.2".into()), true, true)]
    #[case::new_certificate(|s: &mut RdpHealthStatus| probe(s).certificate_not_after = Some(Time(at(2_000_000))), true, true)]
    #[case::endpoint(|s: &mut RdpHealthStatus| s.endpoint.as_mut().unwrap().host = "10.0.0.5".into(), true, true)]
    #[case::became_unreachable(|s: &mut RdpHealthStatus| s.last_transition_to_unreachable = Some(Time(at(120))), true, true)]
    #[case::ladder(|s: &mut RdpHealthStatus| s.ladder.start(Step::rung(Rung::ResetRdpConfig), at(120)), true, true)]
    #[case::diagnosis(|s: &mut RdpHealthStatus| s.diagnosis = Some(evidence()), true, true)]
    #[case::no_probe_any_more(|s: &mut RdpHealthStatus| s.last_probe = None, true, true)]
    fn only_news_is_written(
        #[case] edit: fn(&mut RdpHealthStatus),
        #[case] news: bool,
        #[case] write: bool,
    ) {
        let stored = healthy(100);
        let mut new = stored.clone();
        edit(&mut new);
        assert_eq!(same_for_users(&stored, &new), !news);
        assert_eq!(fingerprint(&stored) == fingerprint(&new), !news);
        assert_eq!(needs_write(Some(&stored), &new, HB), write);
    }

    #[test]
    fn per_probe_facts_carry_over_to_a_status_with_the_same_story() {
        let stored = healthy(100);
        let mut newer = healthy(160);
        newer.last_probe.as_mut().unwrap().latency_ms = 80;
        newer.consecutive_successes = 9;
        newer.recent_probes.push_str("11");
        let mut continued = stored.clone();
        PerProbe::of(&newer).apply(&mut continued);
        assert_eq!(continued, newer);
    }

    #[test]
    fn a_first_status_is_always_written() {
        assert!(needs_write(None, &RdpHealthStatus::default(), HB));
        assert!(needs_write(
            Some(&RdpHealthStatus::default()),
            &healthy(100),
            HB
        ));
    }

    #[test]
    fn an_older_probe_than_the_stored_one_is_no_heartbeat() {
        // Another replica wrote a newer probe: not overwritten for the heartbeat's sake.
        assert!(!needs_write(Some(&healthy(5_000)), &healthy(100), HB));
    }

    #[test]
    fn a_zero_heartbeat_writes_every_probe_but_not_a_look_without_one() {
        let stored = healthy(100);
        assert!(needs_write(Some(&stored), &healthy(130), Duration::ZERO));
        assert!(!needs_write(Some(&stored), &healthy(100), Duration::ZERO));
    }

    /// What the engine itself makes of probes: a healthy VM probed again (other time, other
    /// latency) is no news; a failed probe, or a certificate that starts expiring, is.
    #[test]
    fn the_engines_statuses_for_repeated_healthy_probes_are_the_same_for_users() {
        use crate::{
            engine::{
                Observation, evaluate,
                testing::{endpoint, failed_report, object, ok_report, tls_report},
            },
            probe::{FailureReason, Finding},
        };
        let probe = |obj: &crate::api::RdpHealth, report, t| {
            let observation = Observation::Probed {
                endpoint: endpoint(),
                report: Box::new(report),
            };
            evaluate(obj, observation, at(t)).status
        };
        let mut obj = object(|_| {});
        let mut statuses = Vec::new();
        for (i, latency) in [12.4, 3.0, 250.0, 7.7].into_iter().enumerate() {
            let report = crate::probe::ProbeReport {
                total_ms: latency,
                ..ok_report()
            };
            let status = probe(&obj, report, 1000 + 30 * i as i64);
            obj.status = Some(status.clone());
            statuses.push(status);
        }
        // The first probe is news (no status before); the ones after it are not.
        for pair in statuses.windows(2) {
            assert!(same_for_users(&pair[0], &pair[1]), "{pair:#?}");
            assert!(!needs_write(Some(&pair[0]), &pair[1], HB));
        }
        let healthy = obj.clone();
        let failed = probe(&healthy, failed_report(FailureReason::TcpTimeout), 1200);
        assert!(needs_write(healthy.status.as_ref(), &failed, HB));
        let expiring = probe(
            &healthy,
            tls_report(10, vec![Finding::CertificateExpiring { days_left: 10 }]),
            1200,
        );
        assert!(needs_write(healthy.status.as_ref(), &expiring, HB));
    }
}
