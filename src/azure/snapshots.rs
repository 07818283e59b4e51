//! OS-disk snapshots through the SDK (compute's disk resource provider, api-version
//! 2024-03-02): create an incremental `Copy` of the VM's OS disk, list a resource group's
//! snapshots, delete one. Like every other write, the create is sent once with `.send()` and
//! its operation handle is returned for our own poller.

use azure_mgmt_compute::package_2024_07_01 as compute;
use futures::StreamExt;
use serde_json::Value;

use super::{
    AzureResult,
    arm_map::{map_vm, operation},
    client::ArmClient,
    error::AzureError,
    model::{OperationKind, SnapshotInfo, SnapshotRequest, VmRef},
};

impl ArmClient {
    /// PUT `Microsoft.Compute/snapshots/{name}` with `creationData.createOption: Copy`,
    /// `sourceResourceId` = the OS disk, `incremental: true`, in the VM's group and region.
    pub(super) async fn put_os_disk_snapshot(
        &self,
        vm: &VmRef,
        request: &SnapshotRequest,
    ) -> AzureResult<super::Operation> {
        let state = map_vm(self.get_vm(vm).await?);
        let disk = state.os_disk_id.ok_or_else(|| {
            AzureError::invalid(format!(
                "VM {vm} has no managed OS disk (storageProfile.osDisk.managedDisk.id) to snapshot"
            ))
        })?;
        let mut creation =
            compute::models::CreationData::new(compute::models::creation_data::CreateOption::Copy);
        creation.source_resource_id = Some(disk.clone());
        let mut properties = compute::models::SnapshotProperties::new(creation);
        properties.incremental = Some(true);
        let mut resource = compute::models::Resource::new(state.location);
        resource.tags = Some(Value::Object(
            request
                .tags
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        ));
        let mut body = compute::models::Snapshot::new(resource);
        body.properties = Some(properties);
        let rsp = self
            .compute
            .snapshots_client()
            .create_or_update(&vm.subscription, &vm.resource_group, &request.name, body)
            .send()
            .await
            .map_err(|e| AzureError::from_sdk(&e, &format!("snapshot {}", request.name)))?;
        Ok(operation(
            OperationKind::Snapshot,
            vm,
            rsp.as_raw_response().headers(),
            Some(disk),
        ))
    }

    /// Every snapshot of the VM's resource group, every page.
    pub(super) async fn snapshots_of_group(&self, vm: &VmRef) -> AzureResult<Vec<SnapshotInfo>> {
        let mut pages = self
            .compute
            .snapshots_client()
            .list_by_resource_group(&vm.subscription, &vm.resource_group)
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                AzureError::from_sdk(&e, &format!("snapshots of group {}", vm.resource_group))
            })?;
            out.extend(page.value.into_iter().map(info));
        }
        Ok(out)
    }

    /// DELETE `Microsoft.Compute/snapshots/{name}`; a snapshot already gone is not an error.
    pub(super) async fn delete_snapshot_named(&self, vm: &VmRef, name: &str) -> AzureResult<()> {
        match self
            .compute
            .snapshots_client()
            .delete(&vm.subscription, &vm.resource_group, name)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match AzureError::from_sdk(&e, &format!("snapshot {name}")) {
                AzureError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

fn info(s: compute::models::Snapshot) -> SnapshotInfo {
    let props = s.properties;
    let tags = match s.resource.tags {
        Some(Value::Object(map)) => map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|v| (k, v.to_owned())))
            .collect(),
        _ => Default::default(),
    };
    SnapshotInfo {
        id: s.resource.id.unwrap_or_default(),
        name: s.resource.name.unwrap_or_default(),
        time_created: props.as_ref().and_then(|p| p.time_created).and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }),
        provisioning_state: props.as_ref().and_then(|p| p.provisioning_state.clone()),
        source_resource_id: props.and_then(|p| p.creation_data.source_resource_id),
        tags,
    }
}
