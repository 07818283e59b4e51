//! Managed disks and snapshots of the simulated estate: each VM has one managed OS disk;
//! snapshots are incremental copies of it, as `Microsoft.Compute/snapshots` (compute's disk
//! resource provider, api-version 2024-03-02) shapes them.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::world::Vm;

/// The id of a VM's managed OS disk (`storageProfile.osDisk.managedDisk.id`), named the way
/// the portal names it (`<vm>_OsDisk_1_<32 hex digits>`).
pub fn os_disk_id(vm: &Vm) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{}",
        vm.sub,
        vm.rg,
        os_disk_name(vm)
    )
}

/// The OS disk's name.
pub fn os_disk_name(vm: &Vm) -> String {
    let hex: String = vm
        .vm_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{}_OsDisk_1_{hex}", vm.name)
}

/// `storageProfile` of the VM model (compute 2024-07-01 `VirtualMachine_Get.json`).
pub fn storage_profile(vm: &Vm) -> Value {
    json!({
        "imageReference": {
            "publisher": "MicrosoftWindowsServer",
            "offer": "WindowsServer",
            "sku": "2022-datacenter-azure-edition",
            "version": "latest"
        },
        "osDisk": {
            "osType": "Windows",
            "name": os_disk_name(vm),
            "createOption": "FromImage",
            "caching": "ReadWrite",
            "managedDisk": { "storageAccountType": "Premium_LRS", "id": os_disk_id(vm) },
            "deleteOption": "Delete",
            "diskSizeGB": 127
        },
        "dataDisks": []
    })
}

/// A snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Subscription as sent.
    pub sub: String,
    /// Resource group as sent.
    pub rg: String,
    /// Name as sent.
    pub name: String,
    /// Region.
    pub location: String,
    /// Tags as sent.
    pub tags: BTreeMap<String, String>,
    /// `creationData.sourceResourceId`.
    pub source: String,
    /// `timeCreated` (RFC 3339).
    pub time_created: String,
    /// `Updating` while the PUT runs, then `Succeeded`.
    pub provisioning_state: String,
    /// `properties.incremental` as sent.
    pub incremental: bool,
}

impl Snapshot {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/{}",
            self.sub, self.rg, self.name
        )
    }

    /// The resource as GET and list return it (2024-03-02 `Snapshot_Get.json` shape:
    /// `sku`, `properties.creationData`, `incremental`, `timeCreated`, `provisioningState`).
    pub fn json(&self) -> Value {
        json!({
            "id": self.id(),
            "name": self.name,
            "type": "Microsoft.Compute/snapshots",
            "location": self.location,
            "tags": self.tags,
            "sku": { "name": "Standard_LRS", "tier": "Standard" },
            "properties": {
                "osType": "Windows",
                "hyperVGeneration": "V2",
                "creationData": {
                    "createOption": "Copy",
                    "sourceResourceId": self.source,
                },
                "diskSizeGB": 127,
                "diskSizeBytes": 136_367_308_800_u64,
                "incremental": self.incremental,
                "incrementalSnapshotFamilyId": format!("{:016x}", super::world::fingerprint_u64(&self.source)),
                "timeCreated": self.time_created,
                "provisioningState": self.provisioning_state,
                "diskState": "Unattached",
                "networkAccessPolicy": "AllowAll",
                "publicNetworkAccess": "Enabled",
                "encryption": { "type": "EncryptionAtRestWithPlatformKey" }
            }
        })
    }
}
