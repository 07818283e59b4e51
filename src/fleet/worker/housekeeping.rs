//! The fleet's incident objects: opening one for a member in trouble (unless another object
//! watches the VM; on hold above the fleet's limit), following the object cache, closing the
//! ones that are done, and keeping their cap annotation in step with the fleet.

use super::*;

impl Worker {
    /// Creates the incident object of a member in trouble (idempotent: the name is fixed).
    pub(super) async fn open_incident(&mut self, key: &str) {
        let sink = Arc::clone(&self.deps.sink);
        if !sink.ready() || !sink.may_write() {
            return;
        }
        let Some(m) = self.members.get(key) else {
            return;
        };
        let Some(trouble) = m.trouble().filter(|_| m.watcher == Watcher::Fleet) else {
            return;
        };
        let vm = m.vm.clone();
        // Looked up again right before the create (the last look may be seconds old): an
        // object that now watches the VM — hand-written, or another fleet's incident — wins,
        // so that one VM never has two ladders because of this fleet.
        if let Some(by) = self.watched_elsewhere(key) {
            if let Some(m) = self.members.get_mut(key) {
                m.watcher = Watcher::Other(by);
            }
            return;
        }
        let hold = self.hold();
        let obj = incident::incident_object(&self.fleet, &vm, hold.as_ref());
        let name = obj.metadata.name.clone().unwrap_or_default();
        match sink.create(&obj).await {
            Ok(created) => {
                if let Some(m) = self.members.get_mut(key) {
                    m.watcher = Watcher::Incident(name.clone());
                }
                if created == Created::New {
                    let what = trouble.describe();
                    let note = match &hold {
                        Some(h) => format!(
                            "{} is {what}: incident {name} opened on hold ({})",
                            vm.vm.name, h.why
                        ),
                        None => format!("{} is {what}: incident {name} opened", vm.vm.name),
                    };
                    let reason = if hold.is_some() {
                        "IncidentHeld"
                    } else {
                        "IncidentOpened"
                    };
                    sink.event(&self.fleet, Severity::Warning, reason, note)
                        .await;
                }
            }
            Err(e) => {
                warn!(fleet = %self.name(), incident = %name, error = %e, "failed to create the incident object; retried at the next look");
            }
        }
    }

    /// The object (`namespace/name`) other than this fleet's incidents that watches the VM
    /// `key`, if the cache holds one.
    fn watched_elsewhere(&self, key: &str) -> Option<String> {
        let uid = self.uid();
        let mut found = None;
        self.deps.sink.for_each_object(&mut |obj| {
            if found.is_none()
                && !incident::owned_by(obj, uid)
                && obj.spec.vm.resource_id.eq_ignore_ascii_case(key)
            {
                found = Some(format!(
                    "{}/{}",
                    obj.metadata.namespace.as_deref().unwrap_or_default(),
                    obj.metadata.name.as_deref().unwrap_or_default()
                ));
            }
        });
        found
    }

    /// Whether a new incident is created on hold: more of the fleet unreachable than its
    /// safety limit allows (the observer, or something fleet-wide, is the likelier cause).
    fn hold(&self) -> Option<Hold> {
        let t = member::tally(&self.members, &self.incidents);
        let limit = self
            .fleet
            .spec
            .safety
            .max_unreachable_percent
            .unwrap_or(self.deps.max_unreachable_percent);
        let members = usize::try_from(t.members).unwrap_or(usize::MAX);
        (members >= self.deps.min_fleet_size && t.unreachable_percent() > u32::from(limit)).then(
            || Hold {
                why: format!(
                    "{}% of the fleet's {} members are unreachable, above its limit of {limit}%",
                    t.unreachable_percent(),
                    t.members
                ),
            },
        )
    }

    /// Follows the object cache (explicit objects, this fleet's incidents), closes incidents,
    /// opens the ones that could not be created before, and writes the status when it changed.
    pub(super) async fn housekeeping(&mut self, now: Instant) {
        let sink = Arc::clone(&self.deps.sink);
        if !sink.ready() {
            return;
        }
        let uid = self.uid().to_owned();
        let namespace = self.fleet.metadata.namespace.clone().unwrap_or_default();
        // VM key → who watches it; this fleet's incidents with what to do about them.
        let mut others: HashMap<String, String> = HashMap::new();
        let mut ours: HashMap<String, (String, IncidentView, Option<Close>)> = HashMap::new();
        // This fleet's incidents whose cap annotation lags the fleet's spec.
        let mut stale_caps: Vec<String> = Vec::new();
        let retention = self
            .policy
            .as_ref()
            .map_or(Duration::from_secs(86_400), |p| p.incident_retention);
        let wall = Timestamp::now();
        sink.for_each_object(&mut |obj| {
            if !incident::owned_by(obj, &uid) {
                let key = obj.spec.vm.resource_id.to_ascii_lowercase();
                let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
                let name = obj.metadata.name.as_deref().unwrap_or_default();
                others.entry(key).or_insert_with(|| format!("{ns}/{name}"));
            }
        });
        sink.for_each_object(&mut |obj| {
            if incident::owned_by(obj, &uid) {
                let key = obj.spec.vm.resource_id.to_ascii_lowercase();
                let name = obj.metadata.name.clone().unwrap_or_default();
                let present = self.members.contains_key(&key);
                let close =
                    incident::close(obj, present, others.contains_key(&key), retention, wall);
                if incident::cap_stale(obj, &self.fleet) {
                    stale_caps.push(name.clone());
                }
                ours.insert(key, (name, incident::view_of(obj), close));
            }
        });
        self.incidents = ours
            .values()
            .map(|(name, view, _)| (name.clone(), view.clone()))
            .collect();
        let interval = self
            .policy
            .as_ref()
            .map_or(Duration::from_secs(30), |p| p.spec.probe.interval);
        for (key, m) in &mut self.members {
            let watcher = if let Some((name, ..)) = ours.get(key) {
                Watcher::Incident(name.clone())
            } else if let Some(by) = others.get(key) {
                Watcher::Other(by.clone())
            } else {
                Watcher::Fleet
            };
            if watcher != m.watcher {
                let back = watcher == Watcher::Fleet;
                m.watcher = watcher;
                if back {
                    // Watched by the fleet again: judged from scratch.
                    m.reset();
                    self.queue
                        .push(Reverse((now + offset(key, interval), m.epoch, key.clone())));
                }
            }
        }
        if sink.may_write() {
            self.close_incidents(&ours, &namespace).await;
            self.follow_cap(&stale_caps, &namespace).await;
            let pending: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.watcher == Watcher::Fleet && m.trouble().is_some())
                .map(|(k, _)| k.clone())
                .collect();
            for key in pending {
                self.open_incident(&key).await;
            }
            self.write_status().await;
        }
    }

    /// Deletes this fleet's incident objects that are done (recovered for the retention, VM
    /// gone, or a hand-written object now watches the VM), never with a rung in flight.
    async fn close_incidents(
        &mut self,
        ours: &HashMap<String, (String, IncidentView, Option<Close>)>,
        namespace: &str,
    ) {
        let sink = Arc::clone(&self.deps.sink);
        for (key, (name, _, close)) in ours {
            let why = match close {
                Some(Close::Recovered) => "reachable again for the incident retention".to_owned(),
                Some(Close::LeftFleet) => "its VM left the fleet".to_owned(),
                Some(Close::Superseded) => "another object watches its VM".to_owned(),
                None => continue,
            };
            match sink.delete(namespace, name).await {
                Ok(()) => {
                    info!(fleet = %self.name(), incident = %name, why = %why, "incident closed");
                    sink.event(
                        &self.fleet,
                        Severity::Normal,
                        "IncidentClosed",
                        format!("incident {name} deleted: {why}"),
                    )
                    .await;
                    self.incidents.remove(name);
                    // The next look at the cache decides who watches the VM now.
                    if let Some(m) = self.members.get_mut(key) {
                        m.reset();
                    }
                }
                Err(e) => {
                    warn!(fleet = %self.name(), incident = %name, error = %e, "failed to delete the incident object")
                }
            }
        }
    }

    /// Brings the cap annotation of the incidents in `names` in step with the fleet's
    /// `safety.maxConcurrentDisruptive` (set, changed or removed since they were created).
    async fn follow_cap(&self, names: &[String], namespace: &str) {
        let cap = incident::max_disruptive(&self.fleet);
        for name in names {
            let result = self
                .deps
                .sink
                .annotate(namespace, name, MAX_DISRUPTIVE_ANNOTATION, cap.as_deref())
                .await;
            if let Err(e) = result {
                warn!(fleet = %self.name(), incident = %name, error = %e, "failed to update the incident's disruptive cap; retried at the next look");
            }
        }
    }
}
