//! The primary NIC's private address through the SDK (network 2024-03-01): read it, ask the
//! virtual network whether an address is free (`checkIPAddressAvailability`), and move the
//! NIC to another static address — the "reset network interface" procedure's two calls, used
//! for the reset and for the restore that follows it. The PUT is sent once with `.send()`;
//! its `Azure-AsyncOperation` handle goes to our own poller.

use azure_mgmt_network::package_2024_03 as network;

use super::{
    AzureResult,
    arm_map::{ResourceId, operation},
    client::ArmClient,
    error::AzureError,
    model::{OperationKind, VmRef},
};

/// The primary IP configuration of a VM's primary NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicAddress {
    /// The NIC's resource id.
    pub nic_id: String,
    /// The subnet's resource id.
    pub subnet_id: String,
    /// The private address.
    pub private_ip: String,
    /// `Static` or `Dynamic`.
    pub allocation: String,
    /// The NIC's provisioning state (`Succeeded`, `Updating`, …).
    pub provisioning_state: Option<String>,
}

impl NicAddress {
    /// Azure is still changing the NIC.
    pub fn busy(&self) -> bool {
        self.provisioning_state
            .as_deref()
            .is_some_and(|p| !matches!(p, "Succeeded" | "Failed" | "Canceled"))
    }
}

/// `checkIPAddressAvailability`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpAvailability {
    /// The address asked about is free.
    pub available: bool,
    /// Free addresses Azure suggests (when the one asked about is not).
    pub free: Vec<String>,
}

/// Moving the NIC's primary IP configuration from one address to another, as a static one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressChange {
    /// The NIC.
    pub nic_id: String,
    /// Where it must be now: the PUT is refused (not sent) when it is elsewhere.
    pub from_ip: String,
    /// Where it goes.
    pub to_ip: String,
}

fn primary_config<'a>(
    nic: &'a mut network::models::NetworkInterface,
    nic_id: &str,
) -> AzureResult<&'a mut network::models::NetworkInterfaceIpConfigurationPropertiesFormat> {
    let props = nic
        .properties
        .as_mut()
        .ok_or_else(|| AzureError::invalid(format!("NIC {nic_id} has no properties")))?;
    let idx = props
        .ip_configurations
        .iter()
        .position(|c| {
            c.properties
                .as_ref()
                .and_then(|p| p.primary)
                .unwrap_or(false)
        })
        .unwrap_or(0);
    props
        .ip_configurations
        .get_mut(idx)
        .and_then(|c| c.properties.as_mut())
        .ok_or_else(|| AzureError::invalid(format!("NIC {nic_id} has no IP configuration")))
}

fn allocation(m: Option<&network::models::IpAllocationMethod>) -> String {
    match m {
        Some(network::models::IpAllocationMethod::Static) => "Static".to_owned(),
        _ => "Dynamic".to_owned(),
    }
}

impl ArmClient {
    /// The primary NIC's primary IP configuration.
    pub(super) async fn primary_nic_address(&self, vm: &VmRef) -> AzureResult<NicAddress> {
        let nic_id = self.primary_nic_id(vm).await?;
        let mut nic = self.get_nic(&nic_id).await?;
        let provisioning_state = nic
            .properties
            .as_ref()
            .and_then(|p| p.provisioning_state.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_owned));
        let cfg = primary_config(&mut nic, &nic_id)?;
        Ok(NicAddress {
            private_ip: cfg
                .private_ip_address
                .clone()
                .ok_or_else(|| AzureError::invalid(format!("NIC {nic_id} has no private IP")))?,
            subnet_id: cfg
                .subnet
                .as_ref()
                .and_then(|s| s.sub_resource.id.clone())
                .ok_or_else(|| AzureError::invalid(format!("NIC {nic_id} has no subnet")))?,
            allocation: allocation(cfg.private_ip_allocation_method.as_ref()),
            nic_id,
            provisioning_state,
        })
    }

    /// `GET …/virtualNetworks/{vnet}/CheckIPAddressAvailability?ipAddress=…` for the subnet's
    /// virtual network.
    pub(super) async fn check_ip_availability(
        &self,
        subnet_id: &str,
        ip: &str,
    ) -> AzureResult<IpAvailability> {
        let s = ResourceId::parse(subnet_id)?;
        let r = self
            .network
            .virtual_networks_client()
            .check_ip_address_availability(s.resource_group(), s.name(0)?, ip, s.subscription())
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("addresses of {subnet_id}")))?;
        Ok(IpAvailability {
            available: r.available.unwrap_or(false),
            free: r.available_ip_addresses,
        })
    }

    /// GET the NIC, check it is on `from_ip`, set `to_ip` as a static address (keeping the
    /// subnet, the public IP and everything else), PUT it back.
    pub(super) async fn put_nic_address(
        &self,
        vm: &VmRef,
        change: &AddressChange,
    ) -> AzureResult<super::Operation> {
        let nic_id = &change.nic_id;
        let r = ResourceId::parse(nic_id)?;
        let mut nic = self.get_nic(nic_id).await?;
        let cfg = primary_config(&mut nic, nic_id)?;
        let current = cfg.private_ip_address.clone().unwrap_or_default();
        if current != change.from_ip {
            return Err(AzureError::invalid(format!(
                "NIC {nic_id} is on {current}, not on {} as recorded: nothing was sent",
                change.from_ip
            )));
        }
        cfg.private_ip_address = Some(change.to_ip.clone());
        cfg.private_ip_allocation_method = Some(network::models::IpAllocationMethod::Static);
        let rsp = self
            .network
            .network_interfaces_client()
            .create_or_update(r.resource_group(), r.name(0)?, nic, r.subscription())
            .send()
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("NIC {nic_id}")))?;
        // A NIC's address is not cached; its subnet's and the NSGs' contents do not change
        // with it, so their cached reads stay valid.
        Ok(operation(
            OperationKind::ResetNic,
            vm,
            rsp.as_raw_response().headers(),
            Some(format!(
                "previousIp={} newIp={}",
                change.from_ip, change.to_ip
            )),
        ))
    }
}
