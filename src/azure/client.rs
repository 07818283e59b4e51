//! The production adapter: the real SDK crates, with their retries off, our policies in the
//! pipeline, `.send()` for every long-running operation and our own poller.

use std::{sync::Arc, time::Duration};

use azure_core::{ClientOptions, Method, Pipeline, RetryOptions, Url, auth::TokenCredential};
use azure_mgmt_compute::package_2024_07_01 as compute;
use azure_mgmt_network::package_2024_03 as network;
use azure_mgmt_resourcehealth::package_2024_02 as health;
use serde_json::{Value, json};

use super::{
    Azure, AzureResult,
    arm_map::*,
    cache::TtlCache,
    credential::ARM_SCOPE,
    error::{AzureError, from_status},
    limiter::{Limiter, LimiterConfig},
    model::*,
    nic::{AddressChange, IpAvailability, NicAddress},
    policy,
};

/// Settings of the adapter.
#[derive(Debug, Clone)]
pub struct ArmConfig {
    /// `https://management.azure.com` in production, the simulator's URL in tests.
    pub endpoint: Url,
    /// Per-subscription limits.
    pub limiter: LimiterConfig,
    /// Bound on each HTTP exchange.
    pub request_timeout: Duration,
    /// How long NSG and subnet reads are reused.
    pub cache_ttl: Duration,
    /// Largest serial log tail kept, bytes.
    pub serial_log_max_bytes: usize,
}

impl ArmConfig {
    /// Public Azure (`https://management.azure.com`).
    pub fn public_cloud() -> Result<Self, AzureError> {
        Url::parse("https://management.azure.com")
            .map(Self::new)
            .map_err(|e| AzureError::invalid(format!("endpoint: {e}")))
    }

    /// Defaults for `endpoint`.
    pub fn new(endpoint: Url) -> Self {
        Self {
            endpoint,
            limiter: LimiterConfig::default(),
            request_timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(60),
            serial_log_max_bytes: 256 * 1024,
        }
    }
}

/// The SDK-backed implementation of [`Azure`].
pub struct ArmClient {
    pub(super) compute: compute::Client,
    pub(super) network: network::Client,
    health: health::Client,
    pub(super) credential: Arc<dyn TokenCredential>,
    /// The only origin (scheme, host, port) the ARM token is sent to.
    pub(super) arm_origin: azure_core::Url,
    pub(super) pipeline: Pipeline,
    nsg_cache: TtlCache<NsgRules>,
    subnet_cache: TtlCache<Option<String>>,
    serial_log_max_bytes: usize,
    /// Resource Graph's quota as its last answer left it (shared by every discovery).
    pub(super) graph_quota: super::graph_client::QuotaState,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient").finish_non_exhaustive()
    }
}

const DEFAULT_VM_ACCESS_NAME: &str = "enablevmAccess";

impl ArmClient {
    /// Builds the clients; every one shares one limiter built from `config.limiter`.
    pub fn new(config: ArmConfig, credential: Arc<dyn TokenCredential>) -> Self {
        let limiter = Arc::new(Limiter::new(config.limiter));
        Self::with_limiter(config, credential, limiter)
    }

    /// Builds the clients around a limiter shared with other adapters (one per process).
    pub fn with_limiter(
        config: ArmConfig,
        credential: Arc<dyn TokenCredential>,
        limiter: Arc<Limiter>,
    ) -> Self {
        let options = || {
            ClientOptions::default()
                .retry(RetryOptions::none())
                .per_retry_policies(policy::policies(limiter.clone(), config.request_timeout))
        };
        let scopes = || vec![ARM_SCOPE.to_owned()];
        let endpoint = config.endpoint.clone();
        Self {
            compute: compute::Client::new(
                endpoint.clone(),
                credential.clone(),
                scopes(),
                options(),
            ),
            network: network::Client::new(
                endpoint.clone(),
                credential.clone(),
                scopes(),
                options(),
            ),
            health: health::Client::new(endpoint, credential.clone(), scopes(), options()),
            pipeline: Pipeline::new(
                Some("rdphealth"),
                Some(env!("CARGO_PKG_VERSION")),
                options(),
                Vec::new(),
                Vec::new(),
            ),
            credential,
            arm_origin: config.endpoint.clone(),
            nsg_cache: TtlCache::new(config.cache_ttl),
            subnet_cache: TtlCache::new(config.cache_ttl),
            serial_log_max_bytes: config.serial_log_max_bytes,
            graph_quota: Default::default(),
        }
    }

    pub(super) async fn get_vm(&self, vm: &VmRef) -> AzureResult<compute::models::VirtualMachine> {
        self.compute
            .virtual_machines_client()
            .get(&vm.resource_group, &vm.name, &vm.subscription)
            .expand("instanceView")
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("VM {vm}")))
    }

    pub(super) async fn get_nic(&self, id: &str) -> AzureResult<network::models::NetworkInterface> {
        let r = ResourceId::parse(id)?;
        self.network
            .network_interfaces_client()
            .get(&r.resource_group, r.name(0)?, &r.subscription)
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("NIC {id}")))
    }

    async fn nsg(&self, id: &str) -> AzureResult<NsgRules> {
        if let Some(hit) = self.nsg_cache.get(id) {
            return Ok(hit);
        }
        let r = ResourceId::parse(id)?;
        let nsg = self
            .network
            .network_security_groups_client()
            .get(&r.resource_group, r.name(0)?, &r.subscription)
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("NSG {id}")))?;
        let rules = map_nsg(id, &nsg);
        self.nsg_cache.put(id, rules.clone());
        Ok(rules)
    }

    /// The NSG id of a subnet (cached).
    async fn subnet_nsg_id(&self, id: &str) -> AzureResult<Option<String>> {
        if let Some(hit) = self.subnet_cache.get(id) {
            return Ok(hit);
        }
        let subnet = self.get_subnet(id).await?;
        let nsg = subnet
            .properties
            .and_then(|p| p.network_security_group)
            .and_then(|n| n.resource.id);
        self.subnet_cache.put(id, nsg.clone());
        Ok(nsg)
    }

    async fn get_subnet(&self, id: &str) -> AzureResult<network::models::Subnet> {
        let r = ResourceId::parse(id)?;
        self.network
            .subnets_client()
            .get(&r.resource_group, r.name(0)?, r.name(1)?, &r.subscription)
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("subnet {id}")))
    }

    pub(super) async fn primary_nic_id(&self, vm: &VmRef) -> AzureResult<String> {
        let state = map_vm(self.get_vm(vm).await?);
        state
            .nic_ids
            .into_iter()
            .next()
            .ok_or_else(|| AzureError::invalid(format!("VM {vm} has no network interface")))
    }

    async fn vm_access(
        &self,
        vm: &VmRef,
        kind: OperationKind,
        settings: Value,
        protected: Value,
    ) -> AzureResult<Operation> {
        let state = map_vm(self.get_vm(vm).await?);
        let name = state
            .vm_access_extension
            .unwrap_or_else(|| DEFAULT_VM_ACCESS_NAME.to_owned());
        let ext = compute::models::VirtualMachineExtension {
            resource_with_optional_location: compute::models::ResourceWithOptionalLocation {
                location: Some(state.location),
                id: None,
                name: None,
                type_: None,
                tags: None,
            },
            properties: Some(compute::models::VirtualMachineExtensionProperties {
                force_update_tag: Some(unique_tag()),
                publisher: Some("Microsoft.Compute".to_owned()),
                type_: Some(VM_ACCESS_TYPE.to_owned()),
                type_handler_version: Some("2.0".to_owned()),
                auto_upgrade_minor_version: Some(true),
                settings: Some(settings),
                protected_settings: Some(protected),
                ..Default::default()
            }),
        };
        let rsp = self
            .compute
            .virtual_machine_extensions_client()
            .create_or_update(&vm.resource_group, &vm.name, &name, ext, &vm.subscription)
            .send()
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("extension {name} of VM {vm}")))?;
        Ok(operation(kind, vm, rsp.as_raw_response().headers(), None))
    }

    async fn send_get(
        &self,
        url: &str,
        authorized: bool,
    ) -> AzureResult<(u16, azure_core::headers::Headers, Vec<u8>)> {
        self.send(Method::Get, url, authorized, None).await
    }

    /// One GET of a polling URL, with failures carried as ARM error outcomes where they
    /// describe the operation rather than our request.
    async fn poll_get(
        &self,
        url: &str,
    ) -> AzureResult<Result<(u16, azure_core::headers::Headers, Vec<u8>), PollOutcome>> {
        match self.send_get(url, true).await {
            Ok(r) => Ok(Ok(r)),
            Err(AzureError::Invalid { message }) => Ok(Err(PollOutcome::Failed {
                code: "OperationFailed".to_owned(),
                message,
            })),
            Err(AzureError::Conflict { code, message, .. }) => {
                Ok(Err(PollOutcome::Failed { code, message }))
            }
            Err(e) => Err(e),
        }
    }
}

/// Sends a VM power action (restart, start, redeploy: each its own SDK builder type, same
/// shape) and returns the operation handle from its headers; never waits for it.
macro_rules! power_action {
    ($self:ident, $vm:ident, $method:ident, $kind:expr) => {{
        let rsp = $self
            .compute
            .virtual_machines_client()
            .$method(&$vm.resource_group, &$vm.name, &$vm.subscription)
            .send()
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("VM {}", $vm)))?;
        Ok(operation($kind, $vm, rsp.as_raw_response().headers(), None))
    }};
}

#[async_trait::async_trait]
impl Azure for ArmClient {
    async fn vm_state(&self, vm: &VmRef) -> AzureResult<VmState> {
        Ok(map_vm(self.get_vm(vm).await?))
    }

    async fn endpoint(&self, vm: &VmRef) -> AzureResult<Endpoint> {
        let state = map_vm(self.get_vm(vm).await?);
        let computer_name = state.computer_name;
        let nic_id = state
            .nic_ids
            .into_iter()
            .next()
            .ok_or_else(|| AzureError::invalid(format!("VM {vm} has no network interface")))?;
        let nic = self.get_nic(&nic_id).await?;
        let props = nic.properties.unwrap_or_default();
        let cfg = props
            .ip_configurations
            .iter()
            .find(|c| {
                c.properties
                    .as_ref()
                    .and_then(|p| p.primary)
                    .unwrap_or(false)
            })
            .or_else(|| props.ip_configurations.first())
            .and_then(|c| c.properties.clone())
            .ok_or_else(|| AzureError::invalid(format!("NIC {nic_id} has no IP configuration")))?;
        let public_ip_id = cfg
            .public_ip_address
            .as_ref()
            .and_then(|p| p.resource.id.clone());
        let (public_ip, public_ip_sku) = match &public_ip_id {
            Some(id) => {
                let r = ResourceId::parse(id)?;
                let pip = self
                    .network
                    .public_ip_addresses_client()
                    .get(&r.resource_group, r.name(0)?, &r.subscription)
                    .await
                    .map_err(|e| AzureError::from_sdk(&e, &format!("public IP {id}")))?;
                let sku = pip.sku.and_then(|s| s.name).map(|n| enum_str(&n));
                (pip.properties.and_then(|p| p.ip_address), sku)
            }
            None => (None, None),
        };
        Ok(Endpoint {
            nic_id,
            private_ip: cfg.private_ip_address,
            public_ip_id,
            public_ip,
            public_ip_sku,
            subnet_id: cfg.subnet.and_then(|s| s.sub_resource.id),
            nic_nsg_id: props.network_security_group.and_then(|n| n.resource.id),
            computer_name,
        })
    }

    async fn network_rules(&self, vm: &VmRef) -> AzureResult<NetworkRules> {
        let endpoint = self.endpoint(vm).await?;
        let subnet_nsg = match &endpoint.subnet_id {
            Some(id) => match self.subnet_nsg_id(id).await? {
                Some(nsg) => Some(self.nsg(&nsg).await?),
                None => None,
            },
            None => None,
        };
        let nic_nsg = match &endpoint.nic_nsg_id {
            Some(id) => Some(self.nsg(id).await?),
            None => None,
        };
        Ok(NetworkRules {
            endpoint,
            subnet_nsg,
            nic_nsg,
        })
    }

    async fn start_ip_flow_verify(
        &self,
        vm: &VmRef,
        watcher: &WatcherRef,
        query: &FlowQuery,
    ) -> AzureResult<Option<Operation>> {
        let params = network::models::VerificationIpFlowParameters {
            target_resource_id: vm.id(),
            direction: network::models::Direction::Inbound,
            protocol: network::models::verification_ip_flow_parameters::Protocol::Tcp,
            local_port: query.local_port.to_string(),
            remote_port: query.remote_port.to_string(),
            local_ip_address: query.local_ip.to_string(),
            remote_ip_address: query.remote_ip.to_string(),
            target_nic_resource_id: None,
        };
        let sent = self
            .network
            .network_watchers_client()
            .verify_ip_flow(
                &watcher.resource_group,
                &watcher.name,
                params,
                &vm.subscription,
            )
            .send()
            .await;
        let rsp = match sent {
            Ok(rsp) => rsp,
            Err(e) => {
                return match AzureError::from_sdk(&e, &format!("network watcher {}", watcher.name))
                {
                    AzureError::NotFound { .. } => Ok(None),
                    other => Err(other),
                };
            }
        };
        let raw = rsp.into_raw_response();
        let mut op = operation(OperationKind::IpFlowVerify, vm, raw.headers(), None);
        if op.completed {
            let body = raw
                .into_body()
                .collect_string()
                .await
                .map_err(|e| AzureError::transient(e.to_string()))?;
            op.detail = Some(body);
        }
        Ok(Some(op))
    }

    async fn resource_health(&self, vm: &VmRef) -> AzureResult<Health> {
        let id = vm.id();
        let status = self
            .health
            .availability_statuses_client()
            .get_by_resource(id.trim_start_matches('/'))
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("health of VM {vm}")))?;
        let p = status.properties.unwrap_or_default();
        Ok(Health {
            availability_state: p
                .availability_state
                .as_ref()
                .map(enum_str)
                .unwrap_or_else(|| "Unknown".to_owned()),
            reason_type: p.reason_type,
            summary: p.summary,
            category: p.category,
            context: p.context,
        })
    }

    async fn boot_diagnostics(&self, vm: &VmRef) -> AzureResult<BootDiagnosticsUris> {
        let r = self
            .compute
            .virtual_machines_client()
            .retrieve_boot_diagnostics_data(&vm.resource_group, &vm.name, &vm.subscription)
            .sas_uri_expiration_time_in_minutes(30)
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("boot diagnostics of VM {vm}")))?;
        Ok(BootDiagnosticsUris {
            screenshot: r.console_screenshot_blob_uri,
            serial_log: r.serial_console_log_blob_uri,
        })
    }

    async fn serial_log(&self, uri: &BootDiagnosticsUris) -> AzureResult<String> {
        let url = uri
            .serial_log
            .as_deref()
            .ok_or_else(|| AzureError::invalid("no serial log URI"))?;
        let (status, _, body) = self.send_get(url, false).await?;
        if !(200..300).contains(&status) {
            return Err(AzureError::invalid(format!(
                "serial log download returned {status}"
            )));
        }
        let start = body.len().saturating_sub(self.serial_log_max_bytes);
        Ok(String::from_utf8_lossy(&body[start..]).into_owned())
    }

    async fn reset_rdp_config(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.vm_access(vm, OperationKind::ResetRdpConfig, json!({}), json!({}))
            .await
    }

    async fn reset_password(
        &self,
        vm: &VmRef,
        user: &str,
        password: &Password,
    ) -> AzureResult<Operation> {
        self.vm_access(
            vm,
            OperationKind::ResetPassword,
            json!({ "UserName": user }),
            json!({ "Password": password.expose() }),
        )
        .await
    }

    async fn run_command(&self, vm: &VmRef, script: &[String]) -> AzureResult<Operation> {
        let input = compute::models::RunCommandInput {
            command_id: "RunPowerShellScript".to_owned(),
            script: script.to_vec(),
            parameters: Vec::new(),
        };
        let rsp = self
            .compute
            .virtual_machines_client()
            .run_command(&vm.resource_group, &vm.name, input, &vm.subscription)
            .send()
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("run command on VM {vm}")))?;
        let raw = rsp.into_raw_response();
        let mut op = operation(OperationKind::RunCommand, vm, raw.headers(), None);
        if op.completed {
            let body = raw
                .into_body()
                .collect_string()
                .await
                .map_err(|e| AzureError::transient(e.to_string()))?;
            op.detail = Some(body);
        }
        Ok(op)
    }

    async fn nic_address(&self, vm: &VmRef) -> AzureResult<NicAddress> {
        self.primary_nic_address(vm).await
    }

    async fn ip_availability(&self, subnet_id: &str, ip: &str) -> AzureResult<IpAvailability> {
        self.check_ip_availability(subnet_id, ip).await
    }

    async fn set_nic_address(&self, vm: &VmRef, change: &AddressChange) -> AzureResult<Operation> {
        self.put_nic_address(vm, change).await
    }

    async fn restart(&self, vm: &VmRef) -> AzureResult<Operation> {
        power_action!(self, vm, restart, OperationKind::Restart)
    }

    async fn start(&self, vm: &VmRef) -> AzureResult<Operation> {
        power_action!(self, vm, start, OperationKind::Start)
    }

    async fn redeploy(&self, vm: &VmRef) -> AzureResult<Operation> {
        power_action!(self, vm, redeploy, OperationKind::Redeploy)
    }

    async fn put_allow_rule(&self, vm: &VmRef, rule: &AllowRule) -> AzureResult<Operation> {
        use network::models::{
            SecurityRuleAccess, SecurityRuleDirection, SecurityRulePropertiesFormat,
            security_rule_properties_format::Protocol,
        };
        let r = ResourceId::parse(&rule.nsg_id)?;
        let mut props = SecurityRulePropertiesFormat::new(
            Protocol::Tcp,
            SecurityRuleAccess::Allow,
            rule.priority,
            SecurityRuleDirection::Inbound,
        );
        props.description = Some(rule.description.clone());
        props.source_port_range = Some("*".to_owned());
        props.destination_port_range = Some(rule.port.to_string());
        props.destination_address_prefix = Some(rule.destination_prefix.clone());
        match rule.source_prefixes.as_slice() {
            [one] => props.source_address_prefix = Some(one.clone()),
            many => props.source_address_prefixes = many.to_vec(),
        }
        let body = network::models::SecurityRule {
            properties: Some(props),
            ..Default::default()
        };
        let rsp = self
            .network
            .security_rules_client()
            .create_or_update(
                &r.resource_group,
                r.name(0)?,
                &rule.name,
                body,
                &r.subscription,
            )
            .send()
            .await
            .map_err(|e| {
                AzureError::from_sdk(&e, &format!("rule {} of NSG {}", rule.name, rule.nsg_id))
            })?;
        self.nsg_cache.clear();
        Ok(operation(
            OperationKind::PutNsgRule,
            vm,
            rsp.as_raw_response().headers(),
            Some(format!("{}/securityRules/{}", rule.nsg_id, rule.name)),
        ))
    }

    async fn create_os_disk_snapshot(
        &self,
        vm: &VmRef,
        request: &SnapshotRequest,
    ) -> AzureResult<Operation> {
        self.put_os_disk_snapshot(vm, request).await
    }

    async fn list_snapshots(&self, vm: &VmRef) -> AzureResult<Vec<SnapshotInfo>> {
        self.snapshots_of_group(vm).await
    }

    async fn delete_snapshot(&self, vm: &VmRef, name: &str) -> AzureResult<()> {
        self.delete_snapshot_named(vm, name).await
    }

    async fn poll(&self, op: &Operation) -> AzureResult<PollOutcome> {
        if op.completed {
            let result = match &op.detail {
                Some(body) if needs_result(op.kind) => parse_result(op.kind, body.as_bytes())?,
                _ => OperationResult::Done,
            };
            return Ok(PollOutcome::Succeeded { result });
        }
        if let Some(aao) = &op.async_operation {
            let (status, headers, body) = match self.poll_get(aao).await? {
                Ok(r) => r,
                Err(outcome) => return Ok(outcome),
            };
            let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let state = value.get("status").and_then(Value::as_str).unwrap_or("");
            match state {
                "Succeeded" => {}
                "Failed" | "Canceled" => {
                    let (code, message) = error_of(&value);
                    return Ok(PollOutcome::Failed { code, message });
                }
                _ if status == 200 || status == 202 => {
                    return Ok(PollOutcome::Pending {
                        retry_after: retry_after(&headers),
                    });
                }
                _ => {
                    return Err(from_status(
                        azure_core::StatusCode::try_from(status)
                            .unwrap_or(azure_core::StatusCode::InternalServerError),
                        "Unknown",
                        String::from_utf8_lossy(&body).into_owned(),
                        "operation",
                    ));
                }
            }
            if !needs_result(op.kind) {
                return Ok(PollOutcome::Succeeded {
                    result: OperationResult::Done,
                });
            }
            if let Some(output) = value.pointer("/properties/output")
                && op.kind == OperationKind::RunCommand
            {
                let body = serde_json::to_vec(output).unwrap_or_default();
                return Ok(PollOutcome::Succeeded {
                    result: parse_result(op.kind, &body)?,
                });
            }
        }
        let Some(location) = &op.location else {
            return Ok(PollOutcome::Succeeded {
                result: OperationResult::Done,
            });
        };
        let (status, headers, body) = match self.poll_get(location).await? {
            Ok(r) => r,
            Err(outcome) => return Ok(outcome),
        };
        match status {
            202 => Ok(PollOutcome::Pending {
                retry_after: retry_after(&headers),
            }),
            204 => Ok(PollOutcome::Succeeded {
                result: OperationResult::Done,
            }),
            _ if body.is_empty() || !needs_result(op.kind) => Ok(PollOutcome::Succeeded {
                result: OperationResult::Done,
            }),
            _ => Ok(PollOutcome::Succeeded {
                result: parse_result(op.kind, &body)?,
            }),
        }
    }
}
