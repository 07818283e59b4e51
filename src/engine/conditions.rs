//! Pure condition merging: `lastTransitionTime` moves only when a condition's status flips;
//! `observedGeneration` is stamped on every write.

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// A condition's tri-state status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl Status {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }

    /// The status a wire value names (anything else is Unknown).
    pub fn parse(s: &str) -> Self {
        match s {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }
}

/// The desired state of one condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Condition type.
    pub type_: &'static str,
    /// Status.
    pub status: Status,
    /// PascalCase reason.
    pub reason: String,
    /// Message for people.
    pub message: String,
}

impl Desired {
    /// A desired condition.
    pub fn new(
        type_: &'static str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The status of condition `type_`, if present.
pub fn status_of(conditions: &[Condition], type_: &str) -> Option<Status> {
    find(conditions, type_).map(|c| Status::parse(&c.status))
}

/// Condition `type_`, if present.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets `desired` in `conditions`, keeping `lastTransitionTime` unless the status flips.
/// Returns the previous status (`None` when the condition is new).
pub fn merge(
    conditions: &mut Vec<Condition>,
    desired: Desired,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Status> {
    let previous = status_of(conditions, desired.type_);
    let transition = match (previous, find(conditions, desired.type_)) {
        (Some(prev), Some(old)) if prev == desired.status => old.last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: desired.type_.to_string(),
        status: desired.status.as_str().to_string(),
        reason: desired.reason,
        message: desired.message,
        observed_generation: generation,
        last_transition_time: transition,
    };
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(slot) => *slot = condition,
        None => conditions.push(condition),
    }
    previous
}

/// Stamps `generation` on every condition (conditions not rewritten this time still describe
/// the current generation once the status is written).
pub fn stamp_generation(conditions: &mut [Condition], generation: Option<i64>) {
    for c in conditions {
        c.observed_generation = generation;
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn existing(status: &str, at: i64) -> Vec<Condition> {
        vec![Condition {
            type_: "Reachable".into(),
            status: status.into(),
            reason: "Old".into(),
            message: "old".into(),
            observed_generation: Some(1),
            last_transition_time: Time(ts(at)),
        }]
    }

    #[rstest]
    #[case::new_condition(vec![], Status::True, None, 500)]
    #[case::same_status_keeps_time(existing("True", 100), Status::True, Some(Status::True), 100)]
    #[case::flip_moves_time(existing("True", 100), Status::False, Some(Status::True), 500)]
    #[case::unknown_to_true(existing("Unknown", 100), Status::True, Some(Status::Unknown), 500)]
    #[case::false_stays_false(existing("False", 100), Status::False, Some(Status::False), 100)]
    fn merge_moves_transition_time_only_on_flip(
        #[case] mut conditions: Vec<Condition>,
        #[case] status: Status,
        #[case] previous: Option<Status>,
        #[case] transition: i64,
    ) {
        let got = merge(
            &mut conditions,
            Desired::new("Reachable", status, "New", "new"),
            Some(2),
            ts(500),
        );
        assert_eq!(got, previous);
        assert_eq!(conditions.len(), 1);
        let c = &conditions[0];
        assert_eq!(c.status, status.as_str());
        assert_eq!(c.reason, "New");
        assert_eq!(c.message, "new");
        assert_eq!(c.observed_generation, Some(2));
        assert_eq!(c.last_transition_time, Time(ts(transition)));
    }

    #[test]
    fn merge_leaves_other_types_alone() {
        let mut conditions = existing("True", 100);
        merge(
            &mut conditions,
            Desired::new("Valid", Status::True, "SpecValid", ""),
            Some(3),
            ts(200),
        );
        assert_eq!(conditions.len(), 2);
        assert_eq!(conditions[0].reason, "Old");
        stamp_generation(&mut conditions, Some(3));
        assert!(conditions.iter().all(|c| c.observed_generation == Some(3)));
    }
}
