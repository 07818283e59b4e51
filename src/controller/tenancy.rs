//! The tenancy policy in the controller: which namespaces may name which VMs (by name, or by
//! their labels, followed through a Namespace reflector), and the Azure side each object is
//! handled with — the operator's own identity, or the workload identity the policy names for
//! its namespace (one client per identity, made on first use and kept).

use std::collections::BTreeMap;

use super::runner::{Trigger, Triggers};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    core::PartialObjectMeta,
    runtime::reflector::{ObjectRef, Store},
};

use super::*;
use crate::{
    azure::{AzureIdentity, Federation},
    engine::{AzureResolver, ResolverPolicy},
    tenancy::{NoGrant, TenancyPolicy},
};

/// The namespaces as the reflector last saw them (metadata only).
pub(super) type Namespaces = Store<PartialObjectMeta<Namespace>>;

/// What the policy says about one object.
pub(super) enum Tenancy {
    /// Act, as `Some` identity or the operator's own.
    Act(Option<AzureIdentity>),
    /// Refuse: `Valid=False` with this message, no Azure call.
    Refuse(String),
    /// The namespace's labels are not known yet: neither act nor refuse.
    Wait,
}

/// The Azure side of objects handled as one identity.
pub(super) struct Acting {
    pub(super) resolver: Arc<dyn EndpointResolver>,
    pub(super) remediator: Option<Remediator>,
}

/// What the controller keeps for tenancy.
#[derive(Default)]
pub(super) struct TenancyState {
    /// The policy; `None`: every namespace, every scope, the operator's identity.
    pub(super) policy: Option<Arc<TenancyPolicy>>,
    /// Namespaces' labels, followed only when the policy selects by label.
    pub(super) namespaces: Option<Namespaces>,
    /// Exchanges the operator's federated token for the identities the policy names.
    pub(super) federation: Option<Arc<Federation>>,
    /// One Azure side per identity, made on first use.
    pub(super) acting: Mutex<HashMap<AzureIdentity, Arc<Acting>>>,
}

impl Context {
    /// What the policy says about `obj` in `key.namespace`. A resource ID that does not parse
    /// is left to the spec validation.
    pub(super) fn tenancy_of(&self, obj: &RdpHealth, key: &ObjectKey) -> Tenancy {
        let Some(policy) = &self.tenancy.policy else {
            return Tenancy::Act(None);
        };
        let labels = self.tenancy.namespaces.as_ref().and_then(|store| {
            store
                .get(&ObjectRef::new(&key.namespace))
                .map(|ns| ns.metadata.labels.clone().unwrap_or_default())
        });
        let grant = match policy.grant(&key.namespace, labels.as_ref()) {
            Ok(grant) => grant,
            Err(NoGrant::Refused(why)) => return Tenancy::Refuse(why),
            Err(NoGrant::LabelsUnknown) => return Tenancy::Wait,
        };
        if let Ok(vm) = engine::spec::parse_resource_id(&obj.spec.vm.resource_id)
            && let Err(why) = grant.admit(&vm)
        {
            return Tenancy::Refuse(why);
        }
        Tenancy::Act(grant.identity)
    }

    /// The Azure side for `identity`, or why it cannot be used (shown in `Valid`): the
    /// operator's own identity is never used in its place.
    pub(super) fn acting_as(&self, identity: &AzureIdentity) -> Result<Arc<Acting>, String> {
        let mut acting = self
            .tenancy
            .acting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = acting.get(identity) {
            return Ok(Arc::clone(found));
        }
        let client = match &self.tenancy.federation {
            Some(federation) => federation.client(identity).map_err(|e| e.to_string())?,
            None => {
                return Err(format!(
                    "the tenancy policy names Azure identity {} for this namespace, but the operator runs without Azure credentials: nothing is asked of Azure for it",
                    identity.client_id
                ));
            }
        };
        let client: Arc<dyn Azure> = Arc::new(client);
        let counted = match &self.seams.azure {
            Some(own) => own.sharing(client),
            None => CountedAzure::new(client).map_err(|e| e.to_string())?,
        };
        let azure: Arc<dyn Azure> = Arc::new(counted);
        let side = Arc::new(Acting {
            resolver: Arc::new(AzureResolver::new(
                Arc::clone(&azure),
                ResolverPolicy::default(),
            )),
            remediator: self
                .remediator
                .as_ref()
                .map(|r| Remediator { azure, ..r.clone() }),
        });
        acting.insert(identity.clone(), Arc::clone(&side));
        Ok(side)
    }
}

/// The labels each namespace had when last seen, so that only a change of labels
/// reconciles its objects again (a namespace seen for the first time — at start, or new —
/// changes nothing: its objects are reconciled anyway, and wait until its labels are known).
#[derive(Default)]
pub(super) struct SeenLabels(Mutex<HashMap<String, BTreeMap<String, String>>>);

impl SeenLabels {
    /// Records `namespace`'s labels; whether they differ from those seen before.
    pub(super) fn changed(&self, namespace: &PartialObjectMeta<Namespace>) -> bool {
        let Some(name) = namespace.metadata.name.clone() else {
            return false;
        };
        let labels = namespace.metadata.labels.clone().unwrap_or_default();
        let mut seen = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        seen.insert(name, labels.clone())
            .is_some_and(|before| before != labels)
    }
}

/// The objects of a namespace whose labels changed: each is reconciled again, so one whose
/// namespace lost its grant is refused before it acts again.
pub(super) fn objects_in(
    store: &Store<DeserializeGuard<RdpHealth>>,
    namespace: &PartialObjectMeta<Namespace>,
) -> Vec<ObjectRef<DeserializeGuard<RdpHealth>>> {
    let Some(name) = namespace.metadata.name.as_deref() else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter_map(|guard| {
            let meta = meta_of(guard);
            (meta.namespace.as_deref() == Some(name))
                .then(|| ObjectRef::new(meta.name.as_deref().unwrap_or_default()).within(name))
        })
        .collect()
}

/// When `policy` selects namespaces by label: a reflector of Namespaces (metadata only) whose
/// every change of labels reconciles the objects in that namespace again (as triggers), and
/// the labels it holds.
pub(super) fn follow_namespaces(
    client: &Client,
    objects: &Store<DeserializeGuard<RdpHealth>>,
    policy: Option<&TenancyPolicy>,
) -> (Option<Triggers>, Option<Namespaces>) {
    if !policy.is_some_and(TenancyPolicy::selects_by_label) {
        return (None, None);
    }
    let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
    let writer = Writer::default();
    let labels = writer.as_reader();
    // After the reflector, so that the labels are in the store when the objects reconcile.
    let changes = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .applied_objects();
    let objects = objects.clone();
    let seen = SeenLabels::default();
    let triggers = changes
        .filter_map(|ns| std::future::ready(ns.ok()))
        .flat_map(move |ns| {
            let refs = if seen.changed(&ns) {
                objects_in(&objects, &ns)
            } else {
                Vec::new()
            };
            futures::stream::iter(refs.into_iter().map(Trigger::One))
        })
        .boxed();
    (Some(triggers), Some(labels))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::runtime::{reflector::store::Writer, watcher::Event};

    use super::*;
    use crate::{
        azure::{ArmClient, ArmConfig, StaticToken},
        engine::HostOverride,
        probe::RdpProber,
    };

    const A: &str = "aaaaaaaa-0000-0000-0000-000000000001";
    const B: &str = "bbbbbbbb-0000-0000-0000-000000000002";

    /// A context whose API server is never called, whose own Azure identity is a fixed token,
    /// and which exchanges a federated token for others when `federation` is set.
    fn context(federation: bool) -> Context {
        let (service, _handle) = tower_test::mock::pair::<
            ::http::Request<kube::client::Body>,
            ::http::Response<kube::client::Body>,
        >();
        let client = Client::new(service, "default");
        let url = azure_core::Url::parse("http://127.0.0.1:9").unwrap();
        let own: Arc<dyn Azure> = Arc::new(ArmClient::new(
            ArmConfig::new(url.clone()),
            Arc::new(StaticToken::new("own")),
        ));
        let seams = Seams {
            prober: Arc::new(RdpProber::new().unwrap()),
            resolver: Arc::new(HostOverride),
            azure: Some(Arc::new(CountedAzure::new(own).unwrap())),
            identities: federation.then(|| {
                Arc::new(Federation::new(
                    ArmConfig::new(url.clone()),
                    url,
                    Some("11111111-2222-3333-4444-555555555555".into()),
                    Some("/var/run/secrets/azure/tokens/azure-identity-token".into()),
                ))
            }),
            graph: None,
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        Context::new(client, seams, metrics, Leadership::always(), None)
            .with_remediation(FleetPolicy::default(), None)
    }

    fn identity(client_id: &str) -> AzureIdentity {
        AzureIdentity {
            client_id: client_id.into(),
            tenant_id: None,
        }
    }

    #[tokio::test]
    async fn one_azure_side_per_identity_made_once_and_never_the_operators_own() {
        let ctx = context(true);
        let a = ctx.acting_as(&identity(A)).unwrap();
        let again = ctx.acting_as(&identity(A)).unwrap();
        let b = ctx.acting_as(&identity(B)).unwrap();
        assert!(Arc::ptr_eq(&a, &again), "cached per identity");
        assert!(!Arc::ptr_eq(&a, &b));
        let own = &ctx.remediator.as_ref().unwrap().azure;
        for side in [&a, &b] {
            let remediator = side
                .remediator
                .as_ref()
                .expect("remediation as that identity");
            assert!(!Arc::ptr_eq(&remediator.azure, own));
            // The fleet limits stay shared across identities.
            assert!(Arc::ptr_eq(
                &remediator.fleet,
                &ctx.remediator.as_ref().unwrap().fleet
            ));
        }
    }

    #[tokio::test]
    async fn without_federation_an_identity_is_refused() {
        let ctx = context(false);
        let Err(why) = ctx.acting_as(&identity(A)) else {
            panic!("acted without a federated token");
        };
        assert!(why.contains(A), "{why}");
    }

    fn object(namespace: &str) -> RdpHealth {
        serde_json::from_value(json!({
            "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
            "metadata": {"name": "x", "namespace": namespace},
            "spec": {"vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-00000000000a/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"}},
        }))
        .unwrap()
    }

    fn namespace(name: &str, labels: &[(&str, &str)]) -> PartialObjectMeta<Namespace> {
        let mut ns = PartialObjectMeta::<Namespace>::default();
        ns.metadata.name = Some(name.into());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        );
        ns
    }

    #[test]
    fn only_a_change_of_labels_counts() {
        let seen = SeenLabels::default();
        assert!(
            !seen.changed(&namespace("a", &[("tenant", "a")])),
            "first sight"
        );
        assert!(
            !seen.changed(&namespace("a", &[("tenant", "a")])),
            "same labels"
        );
        assert!(!seen.changed(&namespace("b", &[])), "another namespace");
        assert!(seen.changed(&namespace("a", &[])), "label removed");
        assert!(
            seen.changed(&namespace("a", &[("tenant", "b")])),
            "label added"
        );
        assert!(
            seen.changed(&namespace("a", &[("tenant", "a")])),
            "value changed"
        );
    }

    #[tokio::test]
    async fn labels_decide_and_unknown_labels_wait() {
        let policy = TenancyPolicy::from_yaml(&format!(
            "namespaces:
  - namespaceSelector: {{matchLabels: {{tenant: a}}}}
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000a]
    azureClientId: {A}
"
        ))
        .unwrap();
        let mut writer = Writer::default();
        writer.apply_watcher_event(&Event::Apply(namespace("team-a", &[("tenant", "a")])));
        writer.apply_watcher_event(&Event::Apply(namespace("team-z", &[("tenant", "z")])));
        let ctx = context(true).with_tenancy(Some(policy), Some(writer.as_reader()));
        let key = |ns: &str| ObjectKey {
            namespace: ns.into(),
            name: "x".into(),
        };
        let decide = |ns: &str| ctx.tenancy_of(&object(ns), &key(ns));
        assert!(matches!(decide("team-a"), Tenancy::Act(Some(id)) if id.client_id == A));
        assert!(matches!(decide("team-z"), Tenancy::Refuse(why) if why.contains("team-z")));
        assert!(matches!(decide("team-new"), Tenancy::Wait));
    }
}
